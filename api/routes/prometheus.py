"""GET /metrics: the service's state in the Prometheus text format, read from the database (and
Redis) at scrape time, so every API process reports the same numbers and nothing is kept in memory.

    lowrank_jobs{status,kind}                       jobs in the database, every status x kind (0 if none)
    lowrank_queued_jobs_db{queue}                   jobs with status=queued in the database, per Celery queue
    lowrank_queued_job_oldest_age_seconds{queue}    age of the oldest of those (0 when there are none)
    lowrank_broker_queue_depth{queue}               messages waiting in the broker (Redis LLEN); Redis only
    lowrank_broker_up                               1 if Redis answered this scrape, else 0; Redis only
    lowrank_job_duration_seconds{kind,status}       histogram: first start -> finish of finished jobs
    lowrank_worker_running_jobs{worker}             running jobs per worker (Celery node name)
    lowrank_worker_heartbeat_age_seconds{worker}    seconds since that worker's latest heartbeat
    lowrank_database_up                             1 if the database answered this scrape, else 0
    lowrank_api_threads{state}                      this API process's request-handler threads:
                                                    "limit" (LOWRANK_API_THREADS) and "busy" (in use)
    process_*                                       the API process itself (CPU, memory, open files)

The two queue measures are kept apart on purpose: the broker's depth is what workers will receive,
the database's count is what the service still owes; with the embedded filesystem broker only the
database's count exists. A broker depth far below the database count means lost messages (the
reaper re-sends them).
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from api.deps import PrincipalDep
from jobs import stats
from jobs.queue import queue_name
from jobs.settings import Settings, get_settings
from jobs.vocabulary import PRIORITIES, QUEUES

log = logging.getLogger(__name__)

router = APIRouter(tags=["monitoring"])


class ServiceCollector(Collector):
    """A prometheus_client collector that queries the database and the broker on every collect()."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queues = {(d, p): queue_name(d, p, settings) for d in QUEUES for p in PRIORITIES}  # type: ignore[arg-type]
        self._redis = None
        if stats.is_redis_broker(settings.broker_url):
            import redis

            # Short timeouts: a dead broker must not stall the scrape (Prometheus times out at 10 s).
            self._redis = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering the collector does not query anything.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        fam = self._families()
        by_name = {f.name: f for f in fam}
        now = dt.datetime.now(dt.UTC)
        try:
            snap = stats.service_stats(url=self.settings.database_url)
        except Exception as exc:  # noqa: BLE001 - reported as lowrank_database_up 0, and logged
            log.warning("metrics: database query failed: %s: %s", type(exc).__name__, exc)
            by_name["lowrank_database_up"].add_metric([], 0)
            yield by_name["lowrank_database_up"]
        else:
            by_name["lowrank_database_up"].add_metric([], 1)
            for (status, kind), n in snap.jobs_by_status_kind.items():
                by_name["lowrank_jobs"].add_metric([status, kind], n)
            for b in snap.backlog:
                q = self.queues[(b.device, b.priority)]
                by_name["lowrank_queued_jobs_db"].add_metric([q], b.jobs)
                age = max(0.0, (now - b.oldest_created_at).total_seconds()) if b.oldest_created_at else 0.0
                by_name["lowrank_queued_job_oldest_age_seconds"].add_metric([q], age)
            hist = by_name["lowrank_job_duration_seconds"]
            for h in snap.durations:
                buckets = [(floatToGoString(b), c) for b, c in zip(snap.buckets, h.cumulative)] + [("+Inf", h.count)]
                hist.add_metric([h.kind, h.status], buckets, sum_value=h.sum_s)
            for w in snap.workers:
                by_name["lowrank_worker_running_jobs"].add_metric([w.worker], w.running_jobs)
                if w.last_heartbeat_at is not None:
                    age = max(0.0, (now - w.last_heartbeat_at).total_seconds())
                    by_name["lowrank_worker_heartbeat_age_seconds"].add_metric([w.worker], age)
            yield from (f for f in fam if f.name not in ("lowrank_broker_queue_depth", "lowrank_broker_up"))
        if self._redis is not None:
            yield from self._broker(by_name)

    def _broker(self, by_name: dict[str, Metric]) -> Iterator[Metric]:
        import redis

        try:
            depths = stats.redis_queue_depths(self._redis, list(self.queues.values()))
        except redis.RedisError as exc:
            log.warning("metrics: Redis broker query failed: %s: %s", type(exc).__name__, exc)
            by_name["lowrank_broker_up"].add_metric([], 0)
            yield by_name["lowrank_broker_up"]
            return
        by_name["lowrank_broker_up"].add_metric([], 1)
        for q, n in depths.items():
            by_name["lowrank_broker_queue_depth"].add_metric([q], n)
        yield by_name["lowrank_broker_up"]
        yield by_name["lowrank_broker_queue_depth"]

    def _families(self) -> list[Metric]:
        fams: list[Metric] = [
            GaugeMetricFamily("lowrank_database_up", "1 if the database answered this scrape, else 0 "
                              "(then no other database metric is exported)"),
            GaugeMetricFamily("lowrank_jobs", "Jobs in the database by status and kind",
                              labels=["status", "kind"]),
            GaugeMetricFamily("lowrank_queued_jobs_db", "Jobs with status=queued in the database, per Celery "
                              "queue (the database's count, not the broker's: see lowrank_broker_queue_depth)",
                              labels=["queue"]),
            GaugeMetricFamily("lowrank_queued_job_oldest_age_seconds", "Seconds since the oldest queued job of "
                              "the queue was created (0 when none is queued)", labels=["queue"]),
            HistogramMetricFamily("lowrank_job_duration_seconds", "Wall time from first start to finish of "
                                  "finished jobs, by kind and final status", labels=["kind", "status"]),
            GaugeMetricFamily("lowrank_worker_running_jobs", "Jobs running on each worker (Celery node name)",
                              labels=["worker"]),
            GaugeMetricFamily("lowrank_worker_heartbeat_age_seconds", "Seconds since the latest heartbeat of "
                              "the running jobs of each worker (the reaper re-queues after "
                              f"{self.settings.stale_after_s:g} s)", labels=["worker"]),
        ]
        if self._redis is not None:
            fams += [
                GaugeMetricFamily("lowrank_broker_up", "1 if the Redis broker answered this scrape, else 0"),
                GaugeMetricFamily("lowrank_broker_queue_depth", "Messages waiting in the Redis broker per Celery "
                                  "queue (LLEN over kombu's priority lists; unacked messages not included)",
                                  labels=["queue"]),
            ]
        return fams


class ThreadPoolCollector(Collector):
    """The per-process limit and use of the threads that run sync handlers (busy == limit means
    requests are waiting for a thread: raise LOWRANK_API_THREADS or add API processes)."""

    def __init__(self, app_state: object) -> None:
        self.app_state = app_state

    def collect(self) -> Iterator[Metric]:
        limiter = getattr(self.app_state, "thread_limiter", None)
        if limiter is None:  # the app's lifespan has not run (never the case under uvicorn)
            return
        fam = GaugeMetricFamily("lowrank_api_threads", "Request-handler threads of this API process: the limit "
                                "(LOWRANK_API_THREADS) and how many are busy (this scrape's own included)",
                                labels=["state"])
        fam.add_metric(["limit"], float(limiter.total_tokens))
        fam.add_metric(["busy"], float(limiter.borrowed_tokens))
        yield fam


_lock = threading.Lock()


def metrics_registry(app_state: object, settings: Settings | None = None) -> CollectorRegistry:
    """The registry of one app (created on first use and kept on `app.state`): the service collector
    and the process collector. Per app, not prometheus_client's global one, so several apps in one
    process (tests) never register the same names twice."""
    registry = getattr(app_state, "prometheus_registry", None)
    if registry is None:
        with _lock:
            registry = getattr(app_state, "prometheus_registry", None)
            if registry is None:
                registry = CollectorRegistry()
                registry.register(ServiceCollector(settings or get_settings()))
                registry.register(ThreadPoolCollector(app_state))
                ProcessCollector(registry=registry)
                app_state.prometheus_registry = registry
    return registry


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}},
)
def metrics(request: Request, _caller: PrincipalDep) -> Response:
    """Jobs by status and kind, queue depths, job durations and worker heartbeats, read at scrape time.

    With LOWRANK_AUTH=required it needs a bearer token like every /api/v1 route (Prometheus:
    `authorization: {credentials_file: ...}` in the scrape config); /healthz and /readyz stay open.
    Sync on purpose: the collectors run blocking database and Redis queries in FastAPI's threadpool.
    """
    state = request.app.state
    body = generate_latest(metrics_registry(state, getattr(state, "settings", None)))
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)

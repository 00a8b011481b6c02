"""Python SDK for the lowrank-lab REST API (httpx only; no torch, no server code).

    from lowrank.client import Client
    c = Client("http://127.0.0.1:8000", token=None)        # or Client() with LOWRANK_URL / LOWRANK_TOKEN
    job = c.submit({"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4})
    sweep = c.sweep(base={...}, grid={"rank": [1, 2, 4], "method": ["spectral", "nkp"]}, seeds=[0, 1, 2])
    c.wait_sweep(sweep["id"], progress=lambda s: print(s["progress"]))
    rows = c.results(sweep["id"])                 # plain rows (dicts)
    df = c.results_frame(sweep["id"])             # pandas DataFrame (needs pandas)
    vs = c.results(sweep["id"], baseline="method=spectral")   # each point versus spectral, paired by seed
    s = c.search(base={...}, space={"rank": "int:1:32", "method": ["spectral", "nkp"]},
                 objectives=["error:min", "params:min"], n_trials=40, parallelism=4)   # a search sweep
    front = c.front(s["id"])                       # its Pareto front (one objective: the best trials)
    up = c.upload("r18.safetensors")               # a state_dict; up["arrays"]: its tensors' names and shapes
    job = c.compress(source_job=train_id, method="whiten", budget=0.25, finetune_epochs=1)  # or upload=..., model=

Ids may be given as unique prefixes (the 8 characters tables show) wherever an id is taken.

Every failed request raises `ApiError` (status code and the server's message, one line); a server
that cannot be reached raises `ConnectionFailed` naming the URL.
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """Base of the SDK's errors; str(exc) is one line meant for a user."""


class ApiError(ClientError):
    def __init__(self, status_code: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message, self.body = status_code, message, body


class ConnectionFailed(ClientError):
    pass


class WaitTimeout(ClientError):
    pass


class UnknownId(ClientError):
    """A short id (prefix) that starts no job / sweep."""


class AmbiguousId(ClientError):
    """A short id (prefix) that starts more than one job / sweep."""


API_PREFIX = "/api/v1"


def _error_message(body: Any) -> str:
    """One line from the API's error shapes: {"detail": str} or {"detail": [{"loc", "msg"}, ...]}."""
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            parts = []
            for d in detail[:3]:
                if isinstance(d, dict):
                    loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
                    parts.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
            return "; ".join(parts) + (f" (+{len(detail) - 3} more)" if len(detail) > 3 else "")
    return str(body)[:500]


class Client:
    """A connection to one lowrank-lab server; `token` is sent as `Authorization: Bearer <token>`."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("LOWRANK_URL") or DEFAULT_URL).rstrip("/")
        path = httpx.URL(self.url).path.rstrip("/")
        if path.endswith(API_PREFIX) or path.endswith("/api"):
            base = self.url[: len(self.url) - len(path)] + path[: path.rindex("/api")]
            raise ClientError(f"{self.url} is the API's path, not the server's base URL: use {base or self.url} "
                              f"(the client adds {API_PREFIX} itself)")
        token = token if token is not None else os.environ.get("LOWRANK_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- plumbing

    def request(self, method: str, path: str, *, expect_json: bool = True, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ConnectionFailed(f"cannot connect to {self.url} ({exc}); is the server running? "
                                   "(set --url or LOWRANK_URL)") from None
        except httpx.TimeoutException:
            raise ConnectionFailed(f"{self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"request to {self.url} failed: {exc}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            message = _error_message(body)
            if r.status_code == 404 and isinstance(body, dict) and body.get("detail") == "Not Found":
                # The router's 404 (no such path), not a missing job: most likely the wrong base URL.
                message = (f"Not Found: {method} {self.url}{path} is no route of a lowrank-lab API; is {self.url} "
                           "the server's base URL (e.g. http://host:8000)?")
            raise ApiError(r.status_code, message, body)
        if not expect_json:
            return r.text
        return r.json() if r.content else None

    # ----------------------------------------------------------------------------- ids

    def _resolve(self, ref: str, what: str, path: str) -> str:
        """The full id a job / sweep id or its unique prefix (4+ hex digits, as shown in tables) names.
        UnknownId or AmbiguousId otherwise; a full id is returned as is (the server says if it exists)."""
        ref = str(ref).strip()
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        page = self.request("GET", path, params={"id_prefix": ref, "limit": 2})
        ids = [item["id"] for item in page["items"]]
        if not ids:
            raise UnknownId(f"no {what} id starts with {ref!r}")
        if len(ids) > 1:
            raise AmbiguousId(f"{what} id {ref!r} is ambiguous: it starts {ids[0]}, {ids[1]}"
                              f"{' and more' if page.get('next_cursor') else ''}; give more digits")
        return ids[0]

    def resolve_job_id(self, ref: str) -> str:
        """A job's full id from its id or a unique prefix of it (e.g. the 8 characters tables show)."""
        return self._resolve(ref, "job", f"{API_PREFIX}/jobs")

    def resolve_sweep_id(self, ref: str) -> str:
        """A sweep's full id from its id or a unique prefix of it."""
        return self._resolve(ref, "sweep", f"{API_PREFIX}/sweeps")

    # ----------------------------------------------------------------------------- jobs

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/api/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        """One job; `job_id` may be a unique prefix (as everywhere an id is taken)."""
        return self.request("GET", f"/api/v1/jobs/{self.resolve_job_id(job_id)}")

    def jobs(self, *, status: str | None = None, kind: str | None = None, sweep: str | None = None,
             tag: str | None = None, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        if sweep is not None:
            sweep = self.resolve_sweep_id(sweep)
        params = {k: v for k, v in {"status": status, "kind": kind, "sweep": sweep, "tag": tag, "limit": limit,
                                    "cursor": cursor}.items() if v is not None}
        return self.request("GET", "/api/v1/jobs", params=params)

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every job matching the filters, following the pagination cursor."""
        cursor = None
        while True:
            page = self.jobs(**filters, limit=1000, cursor=cursor)
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/jobs/{self.resolve_job_id(job_id)}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/jobs/{self.resolve_job_id(job_id)}/retry")

    def metrics(self, job_id: str, names: list[str] | None = None, max_points: int = 1000) -> dict[str, Any]:
        params: dict[str, Any] = {"max_points": max_points}
        if names:
            params["name"] = names
        return self.request("GET", f"/api/v1/jobs/{self.resolve_job_id(job_id)}/metrics", params=params)

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until it is succeeded, failed or cancelled; `progress(job)` after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job_id = self.resolve_job_id(job_id)
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll_s)

    def compress(self, *, source_job: str | None = None, upload: str | None = None, model: str | None = None,
                 small_input: bool | None = None, idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """Submit a compress job: the model of `source_job` (a succeeded train or compress job; id or prefix) or
        of `upload` (an uploaded state_dict of the architecture `model`), with the spec's other fields
        (method, budget | rank | rank_ratio, allocation, refine, calib_images, dataset, finetune_epochs,
        finetune={...}, ...). Returns the job; `wait(job["id"])` for its result."""
        if (source_job is None) == (upload is None):
            raise ClientError("give exactly one of source_job (a train or compress job) or upload (with model)")
        if source_job is not None:
            source: dict[str, Any] = {"job": self.resolve_job_id(source_job)}
            if model is not None:
                source["model"] = model
        else:
            if model is None:
                raise ClientError("an upload needs its architecture: give model (e.g. resnet18)")
            source = {"upload": str(upload), "model": model}
            if small_input is not None:
                source["small_input"] = small_input
        return self.submit({"kind": "compress", "source": source, **fields}, idempotency_key=idempotency_key)

    def latency(self, model: str | None = None, *, rank: int | None = None, rank_ratio: float | None = None,
                source: str | None = None, idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """Submit a latency job: `model` dense against factored at `rank` or `rank_ratio`, or at the per-layer
        ranks of `source` (a succeeded compress job of yours; id or prefix; its model and calibration image size
        are taken), with the spec's other fields (image_size, batches=[1, 32], device, threads, channels_last,
        repeats, per_layer, latency_aware, latency_batch, num_classes, small_input, seed, ...). Returns the job;
        `wait(job["id"])` for its result (end-to-end and per-layer p50/p90, speedup_b<N>, ...)."""
        spec: dict[str, Any] = {"kind": "latency", **fields}
        for key, v in (("model", model), ("rank", rank), ("rank_ratio", rank_ratio)):
            if v is not None:
                spec[key] = v
        if source is not None:
            spec["source"] = self.resolve_job_id(source)
        return self.submit(spec, idempotency_key=idempotency_key)

    # ----------------------------------------------------------------------------- uploads

    def upload(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Upload a weights file (.npy, .npz, .safetensors, .pt); the upload, with its tensors (`arrays`: name ->
        shape, dtype; a .pt's state_dict by its keys). Its id is an approx/learn weights source or a compress
        job's `upload`."""
        from pathlib import Path

        p = Path(path)
        try:
            fh = open(p, "rb")  # noqa: SIM115 - closed below, after the request streamed it
        except OSError as exc:
            raise ClientError(f"cannot read {p}: {exc.strerror}") from None
        with fh:
            return self.request("POST", f"{API_PREFIX}/uploads", files={"file": (p.name, fh)})

    def get_upload(self, upload_id: str) -> dict[str, Any]:
        """One upload and its tensors."""
        return self.request("GET", f"{API_PREFIX}/uploads/{upload_id}")

    # ----------------------------------------------------------------------------- sweeps

    def sweep(self, base: dict[str, Any], grid: dict[str, list[Any]] | None = None, seeds: list[int] | None = None,
              *, name: str | None = None, early_stopping: dict[str, Any] | None = None, strategy: str = "grid",
              search: dict[str, Any] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """Create a sweep; returns the sweep object. strategy "grid": every grid point x seed is one job;
        strategy "search": `search` (space, objectives, n_trials, parallelism, ...; see `search()`) and
        every asked trial runs one job per seed."""
        body: dict[str, Any] = {"base": base}
        if grid is not None or strategy == "grid":
            body["grid"] = grid or {}
        if strategy != "grid":
            body["strategy"] = strategy
        if search is not None:
            body["search"] = search
        if seeds is not None:
            body["seeds"] = seeds
        if name is not None:
            body["name"] = name
        if early_stopping is not None:
            body["early_stopping"] = early_stopping
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/api/v1/sweeps", json=body, headers=headers)

    def search(self, base: dict[str, Any], space: dict[str, Any], objectives: list[Any], n_trials: int, *,
               parallelism: int | None = None, seeds: list[int] | None = None, name: str | None = None,
               sampler: str | None = None, seed: int | None = None, pruner: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Create a search sweep. `space`: dotted spec path -> a dimension, as the API takes it
        ({"type": "int", "low": 1, "high": 32}) or short: "int:1:32", "float:1e-3:0.3:log", or a list of
        choices. `objectives`: "metric:min" / "metric:max" strings or {"metric", "direction"} objects."""
        body: dict[str, Any] = {"space": {k: parse_dimension(k, v) for k, v in space.items()},
                                "objectives": [parse_objective(o) for o in objectives], "n_trials": n_trials}
        for key, value in (("parallelism", parallelism), ("sampler", sampler), ("seed", seed), ("pruner", pruner)):
            if value is not None:
                body[key] = value
        return self.sweep(base, seeds=seeds, name=name, strategy="search", search=body,
                          idempotency_key=idempotency_key)

    def trials(self, sweep_id: str, *, front: bool = False) -> dict[str, Any]:
        """A search sweep's results: {"objectives", "front", "counts", "rows": every trial (front=True: the
        Pareto front, best first)}; each row has number, state, point, values, on_front, job_ids, reason."""
        return self.request("GET", f"/api/v1/sweeps/{self.resolve_sweep_id(sweep_id)}/results",
                            params={"front": "true"} if front else None)

    def front(self, sweep_id: str) -> list[dict[str, Any]]:
        """The trials on a search sweep's Pareto front (one objective: the best), best first, as flat rows:
        number, the space keys, the objectives' values, job_ids."""
        return [_flat_trial(r) for r in self.trials(sweep_id, front=True)["rows"]]

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/sweeps/{self.resolve_sweep_id(sweep_id)}")

    def sweeps(self, *, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self.request("GET", "/api/v1/sweeps", params=params)

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/sweeps/{self.resolve_sweep_id(sweep_id)}/cancel")

    def retry_failed(self, sweep_id: str, *, include_cancelled: bool = False) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/sweeps/{self.resolve_sweep_id(sweep_id)}/retry-failed",
                            params={"include_cancelled": str(include_cancelled).lower()})

    def wait_sweep(self, sweep_id: str, *, timeout: float | None = None, poll_s: float = 1.0,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until no job of the sweep is queued or running; `progress(sweep)` after each poll
        (sweep["progress"] is 0..1, sweep["counts"] the jobs per status)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sweep_id = self.resolve_sweep_id(sweep_id)
        while True:
            sweep = self.get_sweep(sweep_id)
            if progress is not None:
                progress(sweep)
            # Not counts: a search sweep between a told trial and the next ask has no job queued.
            if sweep["status"] not in ("queued", "running"):
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"sweep {sweep_id}: {sweep['counts']['queued'] + sweep['counts']['running']} "
                                  f"of {sweep['total']} jobs unfinished after {timeout:g} s")
            time.sleep(poll_s)

    def _results_params(self, metric: str | None, group_by: list[str] | None, baseline: str | None,
                        comparison: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if metric:
            params["metric"] = metric
        if group_by:
            params["group_by"] = ",".join(group_by)
        if baseline:
            params["baseline"] = baseline
        if comparison:
            params["comparison"] = comparison
        return params

    def results_table(self, sweep_id: str, *, metric: str | None = None, group_by: list[str] | None = None,
                      baseline: str | None = None, comparison: str | None = None) -> dict[str, Any]:
        """The full results object: {"sweep_id", "metric", "group_by", "rows"}; with `baseline`
        ("init=spectral" or "init:spectral"), the paired comparison: {"sweep_id", "metric", "baseline",
        "comparison", "statistic", "confidence", "grid_keys", "rows"} (see the API's ComparisonPublic)."""
        return self.request("GET", f"/api/v1/sweeps/{self.resolve_sweep_id(sweep_id)}/results",
                            params=self._results_params(metric, group_by, baseline, comparison))

    def results(self, sweep_id: str, *, metric: str | None = None, group_by: list[str] | None = None,
                baseline: str | None = None, comparison: str | None = None) -> list[dict[str, Any]]:
        """Flat rows: the group's keys, then mean, std, min, max, n, params, params_min, params_max, job_ids.

        With `baseline="init=spectral"`: one row per other grid point, its grid keys, then the paired
        comparison with its baseline point (paired by seed): comparison (difference | ratio), n, n_unpaired,
        mean, std, ci_low, ci_high (of the difference, or of ln ratio), ratio, ratio_ci_low, ratio_ci_high,
        significant, point_mean, baseline_mean, seeds, job_ids, baseline_job_ids, note."""
        table = self.results_table(sweep_id, metric=metric, group_by=group_by, baseline=baseline,
                                   comparison=comparison)
        if table.get("strategy") == "search":  # a search sweep: its trials
            return [_flat_trial(r) for r in table["rows"]]
        if baseline:
            return [{**r["point"], "comparison": table["comparison"],
                     **{k: v for k, v in r.items() if k not in ("point", "baseline_point")}} for r in table["rows"]]
        return [{**r["point"], **{k: r.get(k) for k in ("mean", "std", "min", "max", "n", "params", "params_min",
                                                        "params_max", "job_ids")}}
                for r in table["rows"]]

    def results_csv(self, sweep_id: str, *, metric: str | None = None, group_by: list[str] | None = None,
                    baseline: str | None = None, comparison: str | None = None, front: bool = False) -> str:
        params = {"format": "csv", **self._results_params(metric, group_by, baseline, comparison)}
        if front:
            params["front"] = "true"
        return self.request("GET", f"/api/v1/sweeps/{self.resolve_sweep_id(sweep_id)}/results", params=params,
                            expect_json=False)

    def results_frame(self, sweep_id: str, *, metric: str | None = None, group_by: list[str] | None = None,
                      baseline: str | None = None, comparison: str | None = None):
        """results() as a pandas DataFrame (ImportError with a hint when pandas is not installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("results_frame needs pandas (pip install pandas); results() gives plain rows") from None
        return pd.DataFrame(self.results(sweep_id, metric=metric, group_by=group_by, baseline=baseline,
                                         comparison=comparison))


DIRECTIONS = {"min": "minimize", "minimize": "minimize", "max": "maximize", "maximize": "maximize"}


def parse_objective(obj: Any) -> dict[str, str]:
    """"error:min" (or :max, :minimize, :maximize) -> {"metric": "error", "direction": "minimize"}; a dict
    is returned as is. ClientError naming the text otherwise."""
    if isinstance(obj, dict):
        return obj
    metric, _, direction = str(obj).rpartition(":")
    if not metric or direction not in DIRECTIONS:
        raise ClientError(f"objective must be METRIC:min or METRIC:max (e.g. error:min, val_top1:max), got {obj!r}")
    return {"metric": metric, "direction": DIRECTIONS[direction]}


def parse_dimension(key: str, spec: Any) -> dict[str, Any]:
    """A search dimension from its short form: "int:LOW:HIGH[:log]", "float:LOW:HIGH[:log]", a list of
    choices; a dict is returned as is. ClientError naming the key otherwise."""
    if isinstance(spec, dict):
        return spec
    if isinstance(spec, (list, tuple)):
        return {"type": "categorical", "choices": list(spec)}
    parts = str(spec).split(":")
    if parts[0] in ("int", "float") and len(parts) in (3, 4) and parts[3:] in ([], ["log"]):
        try:
            low, high = (int(p) if parts[0] == "int" else float(p) for p in parts[1:3])
        except ValueError:
            low = high = None
        if low is not None:
            dim: dict[str, Any] = {"type": parts[0], "low": low, "high": high}
            if parts[3:] == ["log"]:
                dim["log"] = True
            return dim
    raise ClientError(f"space {key}: {spec!r} is not a dimension: use int:LOW:HIGH, float:LOW:HIGH (add :log for "
                      "a log scale) or a list of choices")


def _flat_trial(row: dict[str, Any]) -> dict[str, Any]:
    return {"number": row["number"], "state": row["state"], **row["point"], **(row.get("values") or {}),
            "on_front": row["on_front"], "job_ids": row["job_ids"], "reason": row.get("reason")}


__all__ = ["AmbiguousId", "ApiError", "Client", "ClientError", "ConnectionFailed", "UnknownId", "WaitTimeout"]

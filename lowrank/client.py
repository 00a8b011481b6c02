"""Python SDK for the lowrank-lab REST API (httpx only; no torch, no server code).

    from lowrank.client import Client
    c = Client("http://127.0.0.1:8000", token=None)        # or Client() with LOWRANK_URL / LOWRANK_TOKEN
    job = c.submit({"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4})
    sweep = c.sweep(base={...}, grid={"rank": [1, 2, 4], "method": ["spectral", "nkp"]}, seeds=[0, 1, 2])
    c.wait_sweep(sweep["id"], progress=lambda s: print(s["progress"]))
    rows = c.results(sweep["id"])                 # plain rows (dicts)
    df = c.results_frame(sweep["id"])             # pandas DataFrame (needs pandas)

Every failed request raises `ApiError` (status code and the server's message, one line); a server
that cannot be reached raises `ConnectionFailed` naming the URL.
"""
from __future__ import annotations

import os
import time
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
            raise ApiError(r.status_code, _error_message(body), body)
        if not expect_json:
            return r.text
        return r.json() if r.content else None

    # ----------------------------------------------------------------------------- jobs

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/api/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/jobs/{job_id}")

    def jobs(self, *, status: str | None = None, kind: str | None = None, sweep: str | None = None,
             tag: str | None = None, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
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
        return self.request("POST", f"/api/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/jobs/{job_id}/retry")

    def metrics(self, job_id: str, names: list[str] | None = None, max_points: int = 1000) -> dict[str, Any]:
        params: dict[str, Any] = {"max_points": max_points}
        if names:
            params["name"] = names
        return self.request("GET", f"/api/v1/jobs/{job_id}/metrics", params=params)

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until it is succeeded, failed or cancelled; `progress(job)` after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll_s)

    # ----------------------------------------------------------------------------- sweeps

    def sweep(self, base: dict[str, Any], grid: dict[str, list[Any]], seeds: list[int] | None = None, *,
              name: str | None = None, early_stopping: dict[str, Any] | None = None,
              idempotency_key: str | None = None) -> dict[str, Any]:
        """Create a sweep (every grid point x seed is one job); returns the sweep object."""
        body: dict[str, Any] = {"base": base, "grid": grid}
        if seeds is not None:
            body["seeds"] = seeds
        if name is not None:
            body["name"] = name
        if early_stopping is not None:
            body["early_stopping"] = early_stopping
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/api/v1/sweeps", json=body, headers=headers)

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/sweeps/{sweep_id}")

    def sweeps(self, *, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self.request("GET", "/api/v1/sweeps", params=params)

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/sweeps/{sweep_id}/cancel")

    def retry_failed(self, sweep_id: str, *, include_cancelled: bool = False) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/sweeps/{sweep_id}/retry-failed",
                            params={"include_cancelled": str(include_cancelled).lower()})

    def wait_sweep(self, sweep_id: str, *, timeout: float | None = None, poll_s: float = 1.0,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until no job of the sweep is queued or running; `progress(sweep)` after each poll
        (sweep["progress"] is 0..1, sweep["counts"] the jobs per status)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.get_sweep(sweep_id)
            if progress is not None:
                progress(sweep)
            if sweep["counts"]["queued"] + sweep["counts"]["running"] == 0:
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"sweep {sweep_id}: {sweep['counts']['queued'] + sweep['counts']['running']} "
                                  f"of {sweep['total']} jobs unfinished after {timeout:g} s")
            time.sleep(poll_s)

    def results_table(self, sweep_id: str, *, metric: str | None = None,
                      group_by: list[str] | None = None) -> dict[str, Any]:
        """The full results object: {"sweep_id", "metric", "group_by", "rows"}."""
        params: dict[str, Any] = {}
        if metric:
            params["metric"] = metric
        if group_by:
            params["group_by"] = ",".join(group_by)
        return self.request("GET", f"/api/v1/sweeps/{sweep_id}/results", params=params)

    def results(self, sweep_id: str, *, metric: str | None = None,
                group_by: list[str] | None = None) -> list[dict[str, Any]]:
        """Flat rows: the group's keys, then mean, std, min, max, n, params, job_ids."""
        table = self.results_table(sweep_id, metric=metric, group_by=group_by)
        return [{**r["point"], **{k: r[k] for k in ("mean", "std", "min", "max", "n", "params", "job_ids")}}
                for r in table["rows"]]

    def results_csv(self, sweep_id: str, *, metric: str | None = None, group_by: list[str] | None = None) -> str:
        params: dict[str, Any] = {"format": "csv"}
        if metric:
            params["metric"] = metric
        if group_by:
            params["group_by"] = ",".join(group_by)
        return self.request("GET", f"/api/v1/sweeps/{sweep_id}/results", params=params, expect_json=False)

    def results_frame(self, sweep_id: str, *, metric: str | None = None, group_by: list[str] | None = None):
        """The results as a pandas DataFrame (ImportError with a hint when pandas is not installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("results_frame needs pandas (pip install pandas); results() gives plain rows") from None
        return pd.DataFrame(self.results(sweep_id, metric=metric, group_by=group_by))


__all__ = ["ApiError", "Client", "ClientError", "ConnectionFailed", "WaitTimeout"]

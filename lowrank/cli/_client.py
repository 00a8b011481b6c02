"""What the client commands (lowrank/cli/jobs.py, lowrank/cli/sweeps.py) share: the connection options, the
SDK client, errors as one line (exit 2), command-line values, and a job's result line and warnings."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lowrank.cli._common import CliError

DEFAULT_URL = "http://127.0.0.1:8000"  # = lowrank.client.DEFAULT_URL (not imported: httpx costs every command)
JOB_ID = "a job id, or a unique prefix of it (4+ hex digits, e.g. the 8 that tables show)"
SWEEP_ID = "a sweep id, or a unique prefix of it (4+ hex digits)"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def client(args: argparse.Namespace):
    from lowrank.client import Client

    return Client(args.url, args.token)


def run(fn):
    """Wrap a handler: SDK errors become one-line CliErrors (exit 2)."""
    def handler(args: argparse.Namespace) -> int:
        from lowrank.client import ClientError

        try:
            return fn(args) or 0
        except ClientError as exc:
            raise CliError(one_line(str(exc))) from None
    return handler


def conn_args(p: argparse.ArgumentParser, *, read: bool = False) -> None:
    p.add_argument("--url", default=os.environ.get("LOWRANK_URL", DEFAULT_URL),
                   help=f"the server's base URL, without /api/v1 (default $LOWRANK_URL or {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("LOWRANK_TOKEN"), help="API token (default $LOWRANK_TOKEN)")
    if read:
        p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def value(text: str) -> Any:
    """A command-line value: JSON when it parses (1, 0.5, true, null, [..]), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_json_file(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise CliError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"{what}: {path} is not valid JSON: {exc}") from None


_RESULT_KEYS = ("error", "top1_dense", "top1_compressed", "val_top1", "val_loss", "param_ratio", "time_s",
                "wall_time_s", "run_time_s", "samples", "dense_latency_ms", "latency_ms", "speedup", "slower_layers")


def result_line(res: dict[str, Any]) -> str:
    return "  ".join(f"{k}={res[k]}" for k in _RESULT_KEYS if k in res)


def print_warnings(job: dict[str, Any]) -> None:
    """result.warnings (e.g. an accuracy at chance level), one line each on stderr: seen even with --json."""
    warnings = (job.get("result") or {}).get("warnings") or []
    for w in warnings if isinstance(warnings, list) else [warnings]:
        print(f"warning: job {job['id'][:8]}: {one_line(str(w))}", file=sys.stderr)

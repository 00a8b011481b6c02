"""Client commands on the REST API (through lowrank.client): submit, sweep, results, jobs, cancel, retry, logs.

    lowrank submit approx --m 4096 --d 512 --rank 8 --method nkp [--wait]
    lowrank submit train --model resnet18 --dataset digits --rank-ratio 0.25 --init nkp
    lowrank sweep create --base spec.json --grid rank=1,2,4,8 --grid method=spectral,nkp --seeds 0,1,2
    lowrank sweep watch ID | list | show ID | cancel ID | retry-failed ID
    lowrank results ID [--metric error] [--group-by rank] [--csv]
    lowrank jobs [--status running] / lowrank cancel ID / lowrank retry ID / lowrank logs ID [--follow]

Every command takes --url and --token (default $LOWRANK_URL, $LOWRANK_TOKEN); read commands take
--json. Errors (HTTP 4xx/5xx, server unreachable) are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lowrank.cli._common import CliError, parse_int_list, parse_str_list, print_json

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _client(args: argparse.Namespace):
    from lowrank.client import Client

    return Client(args.url, args.token)


def _run(fn):
    """Wrap a handler: SDK errors become one-line CliErrors (exit 2)."""
    def handler(args: argparse.Namespace) -> int:
        from lowrank.client import ClientError

        try:
            return fn(args) or 0
        except ClientError as exc:
            raise CliError(_one_line(str(exc))) from None
    return handler


def _conn_args(p: argparse.ArgumentParser, *, read: bool = False) -> None:
    p.add_argument("--url", default=os.environ.get("LOWRANK_URL", "http://127.0.0.1:8000"),
                   help="API base URL (default $LOWRANK_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", default=os.environ.get("LOWRANK_TOKEN"), help="API token (default $LOWRANK_TOKEN)")
    if read:
        p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def _value(text: str) -> Any:
    """A command-line value: JSON when it parses (1, 0.5, true, null, [..]), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _set_path(spec: dict[str, Any], key: str, value: Any) -> None:
    node = spec
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CliError(f"--set {key}: {part} is not an object")
    node[parts[-1]] = value


def _read_json_file(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise CliError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"{what}: {path} is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------- submit


def _submit_common(p: argparse.ArgumentParser) -> None:
    _conn_args(p, read=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--tag", action="append", default=None, help="a tag (repeat)")
    p.add_argument("--priority", choices=("high", "normal", "low"), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other spec field, dotted (value parsed as JSON when it can be), e.g. --set mc_samples=1000")
    p.add_argument("--wait", action="store_true", help="wait until the job finishes; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")


def _weights(args: argparse.Namespace) -> dict[str, Any]:
    if args.upload:
        w: dict[str, Any] = {"source": "upload", "upload_id": args.upload}
        if args.key:
            w["key"] = args.key
        return w
    if args.model_layer:
        model, _, layer = args.model_layer.partition(":")
        if not layer:
            raise CliError(f"--model-layer must be MODEL:LAYER (e.g. resnet18:layer1.0.conv1), got {args.model_layer!r}")
        return {"source": "model_layer", "model": model, "layer": layer}
    if args.m is None or args.d is None:
        raise CliError("give --m and --d (a gaussian matrix), --upload ID, or --model-layer MODEL:LAYER")
    return {"source": "gaussian", "m": args.m, "d": args.d}


def _spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    kind = args.kind
    spec: dict[str, Any] = {"kind": kind}
    if kind in ("approx", "learn"):
        spec["weights" if kind == "approx" else "teacher"] = _weights(args)
        spec["rank"] = args.rank
        if kind == "approx":
            if args.method:
                spec["method"] = args.method
        else:
            for f in ("eps", "delta", "noise"):
                if getattr(args, f) is not None:
                    spec[f] = getattr(args, f)
    else:
        for f in ("model", "dataset", "rank", "rank_ratio", "init", "epochs", "batch_size", "lr", "device"):
            v = getattr(args, f, None)
            if v is not None:
                spec[f] = v
    for f in ("seed", "name", "priority"):
        if getattr(args, f) is not None:
            spec[f] = getattr(args, f)
    if args.tag:
        spec["tags"] = args.tag
    for item in args.set:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise CliError(f"--set must be KEY=VALUE, got {item!r}")
        _set_path(spec, key, _value(text))
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    with _client(args) as c:
        job = c.submit(spec)
        if args.wait:
            job = c.wait(job["id"], timeout=args.timeout)
    if args.json:
        print_json(job)
    else:
        print(job["id"] if not args.wait else f"{job['id']} {job['status']}")
        if args.wait and job["status"] == "succeeded" and job.get("result"):
            res = job["result"]
            keys = [k for k in ("error", "val_top1", "val_loss", "time_s", "wall_time_s", "samples") if k in res]
            print("  " + "  ".join(f"{k}={res[k]}" for k in keys))
        elif args.wait and job.get("error"):
            print("  " + _one_line(job["error"])[:300])
    return 0 if (not args.wait or job["status"] == "succeeded") else 1


# --------------------------------------------------------------------------- sweeps


def _parse_grid(items: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key or not text:
            raise CliError(f"--grid must be KEY=V1,V2,... (e.g. rank=1,2,4), got {item!r}")
        if key in grid:
            raise CliError(f"--grid {key} given twice")
        grid[key] = [_value(v) for v in parse_str_list(text)]
    return grid


def cmd_sweep_create(args: argparse.Namespace) -> int:
    base = _read_json_file(args.base, "--base")
    early = None
    if args.early_stopping:
        early = (_read_json_file(args.early_stopping[1:], "--early-stopping") if args.early_stopping.startswith("@")
                 else _value(args.early_stopping))
        if not isinstance(early, dict):
            raise CliError("--early-stopping must be a JSON object or @file.json")
    seeds = parse_int_list(args.seeds, "--seeds") if args.seeds else None
    with _client(args) as c:
        sweep = c.sweep(base, _parse_grid(args.grid), seeds, name=args.name, early_stopping=early,
                        idempotency_key=args.idempotency_key)
        if args.watch:
            sweep = _watch(c, sweep["id"], args.interval, args.timeout, quiet=args.json)
    if args.json:
        print_json(sweep)
    else:
        print(f"{sweep['id']}  {sweep['total']} jobs ({sweep['n_points']} points x {len(sweep['seeds'])} seeds)")
    return 0


def _progress_line(s: dict[str, Any]) -> str:
    c = s["counts"]
    return (f"{s['status']}: {c['succeeded']} succeeded, {c['failed']} failed, {c['cancelled']} cancelled, "
            f"{c['running']} running, {c['queued']} queued of {s['total']}")


def _results_rich_table(table: dict[str, Any], title: str | None = None):
    from rich.table import Table

    t = Table(title=title, caption=f"{table['metric']}: mean ± std over seeds (n)")
    for g in table["group_by"]:
        t.add_column(g)
    for col in ("mean", "std", "min", "max", "n"):
        t.add_column(col, justify="right")
    has_params = any(r.get("params") is not None for r in table["rows"])
    if has_params:
        t.add_column("params", justify="right")
    for r in table["rows"]:
        cells = [str(r["point"][g]) for g in table["group_by"]]
        cells += ["-" if r[k] is None else f"{r[k]:.4g}" for k in ("mean", "std", "min", "max")] + [str(r["n"])]
        if has_params:
            cells.append("-" if r.get("params") is None else f"{r['params']:.0f}")
        t.add_row(*cells)
    return t


def _watch(c, sweep_id: str, interval: float, timeout: float | None, *, quiet: bool = False) -> dict[str, Any]:
    """Live table with a progress bar until the sweep has no queued or running job."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    console = Console(stderr=quiet)
    # The bar keeps to one short line (it must fit 80 columns); the counts get their own line.
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console)
    from lowrank.client import TERMINAL, WaitTimeout

    sweep = c.get_sweep(sweep_id)
    task = bar.add_task(sweep["status"], total=sweep["total"])
    with Live(Group(bar), console=console, refresh_per_second=4, transient=quiet) as live:
        def show(s: dict[str, Any]) -> None:  # after each of the SDK's polls
            nonlocal sweep
            sweep = s
            bar.update(task, completed=sum(s["counts"][k] for k in TERMINAL), description=s["status"])
            live.update(Group(_results_rich_table(c.results_table(sweep_id), title=s.get("name") or sweep_id),
                              Text(_progress_line(s)), bar))

        try:
            return c.wait_sweep(sweep_id, timeout=timeout, poll_s=interval, progress=show)
        except WaitTimeout:
            raise CliError(f"--timeout: sweep {sweep_id} unfinished after {timeout:g} s "
                           f"({_progress_line(sweep)})") from None


def cmd_sweep_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sweep = _watch(c, args.id, args.interval, args.timeout, quiet=args.json)
    if args.json:
        print_json(sweep)
    return 0


def cmd_sweep_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        page = c.sweeps(limit=args.limit)
    if args.json:
        print_json(page)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in ("id", "name", "kind", "status", "progress", "jobs", "created"):
        t.add_column(col)
    for s in page["items"]:
        t.add_row(s["id"], s.get("name") or "", s["kind"], s["status"], f"{100 * s['progress']:.0f}%",
                  str(s["total"]), s["created_at"][:19])
    Console().print(t)
    return 0


def cmd_sweep_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sweep = c.get_sweep(args.id)
    if args.json:
        print_json(sweep)
        return 0
    print(f"sweep {sweep['id']}  {sweep.get('name') or ''}")
    print(f"  kind {sweep['kind']}, {sweep['n_points']} points x {len(sweep['seeds'])} seeds = {sweep['total']} jobs")
    print(f"  grid {json.dumps(sweep['grid'])}, seeds {sweep['seeds']}")
    print(f"  {_progress_line(sweep)} ({100 * sweep['progress']:.0f}%)")
    if sweep.get("early_stopping"):
        print(f"  early stopping {json.dumps(sweep['early_stopping'])}")
    return 0


def cmd_sweep_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sweep = c.cancel_sweep(args.id)
    print_json(sweep) if args.json else print(_progress_line(sweep))
    return 0


def cmd_sweep_retry(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sweep = c.retry_failed(args.id, include_cancelled=args.include_cancelled)
    print_json(sweep) if args.json else print(_progress_line(sweep))
    return 0


# --------------------------------------------------------------------------- results, jobs, logs


def cmd_results(args: argparse.Namespace) -> int:
    group_by = parse_str_list(args.group_by) if args.group_by else None
    with _client(args) as c:
        if args.csv:
            sys.stdout.write(c.results_csv(args.id, metric=args.metric, group_by=group_by))
            return 0
        table = c.results_table(args.id, metric=args.metric, group_by=group_by)
    if args.json:
        print_json(table)
    else:
        from rich.console import Console

        Console().print(_results_rich_table(table, title=f"sweep {args.id}"))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        page = c.jobs(status=args.status, kind=args.kind, sweep=args.sweep, tag=args.tag, limit=args.limit,
                      cursor=args.cursor)
    if args.json:
        print_json(page)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in ("id", "kind", "status", "name / point", "progress", "created"):
        t.add_column(col)
    for j in page["items"]:
        label = j.get("name") or (json.dumps(j["sweep_point"]) + f" seed {j['seed']}" if j.get("sweep_point") else "")
        prog = "" if j.get("progress") is None else f"{100 * j['progress']:.0f}%"
        t.add_row(j["id"], j["kind"], j["status"], label, prog, j["created_at"][:19])
    Console().print(t)
    if page.get("next_cursor"):  # on stderr, so the table stays clean to pipe
        print(f"more jobs: lowrank jobs ... --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.cancel(args.id)
    print_json(job) if args.json else print(f"{job['id']} {job['status']}"
                                            + (" (cancel requested)" if job["status"] == "running" else ""))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.retry(args.id)
    print_json(job) if args.json else print(f"{job['id']} {job['status']}")
    return 0


def _metric_lines(series: list[dict[str, Any]], after_step: int) -> tuple[list[str], int]:
    by_step: dict[int, dict[str, Any]] = {}
    for s in series:
        for step, v in zip(s["steps"], s["values"]):
            if step > after_step:
                by_step.setdefault(step, {})[s["name"]] = v
    lines = [f"step {step:>7}  " + "  ".join(f"{k}={'nan' if v is None else f'{v:.5g}'}" for k, v in sorted(vals.items()))
             for step, vals in sorted(by_step.items())]
    return lines, max(by_step, default=after_step)


def cmd_logs(args: argparse.Namespace) -> int:
    """The job's status, its metric series as lines (step: name=value ...), and its error text."""
    from lowrank.client import TERMINAL

    with _client(args) as c:
        job = c.job(args.id)
        metrics = c.metrics(args.id, max_points=100_000)
        if args.json:
            print_json({"job": job, "metrics": metrics})
            return 0
        print(f"job {job['id']} ({job['kind']}) {job['status']}  worker={job.get('worker') or '-'}  "
              f"attempts={job['attempts']}")
        lines, last = _metric_lines(metrics["series"], -1)
        for line in lines:
            print(line)
        while args.follow and job["status"] not in TERMINAL:
            time.sleep(args.interval)
            job = c.job(args.id)
            lines, last = _metric_lines(c.metrics(args.id, max_points=100_000)["series"], last)
            for line in lines:
                print(line, flush=True)
        if args.follow:
            print(f"job {job['id']} {job['status']}")
        if job.get("error"):
            print(job["error"])
        elif job.get("result") and job["status"] == "succeeded":
            print("result " + json.dumps(job["result"], default=str)[:2000])
    return 0


# --------------------------------------------------------------------------- registration


def register(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("submit", help="submit one job to the API (approx | learn | train)")
    ksub = p.add_subparsers(dest="kind", metavar="KIND", parser_class=type(p))
    ksub.required = True
    for kind in ("approx", "learn"):
        k = ksub.add_parser(kind, help=f"a {kind} job")
        k.add_argument("--m", type=int, help="rows of a gaussian matrix")
        k.add_argument("--d", type=int, help="columns of a gaussian matrix")
        k.add_argument("--upload", help="an upload id (POST /api/v1/uploads) instead of a gaussian matrix")
        k.add_argument("--key", help="array name inside the upload")
        k.add_argument("--model-layer", help="MODEL:LAYER, a fresh-init layer of a registered model")
        k.add_argument("--rank", type=int, required=True)
        if kind == "approx":
            k.add_argument("--method", choices=("spectral", "rescale", "nkp", "random", "reference"))
        else:
            k.add_argument("--eps", type=float)
            k.add_argument("--delta", type=float)
            k.add_argument("--noise", type=float)
        _submit_common(k)
        k.set_defaults(handler=_run(cmd_submit))
    k = ksub.add_parser("train", help="a training job (factored ResNet / EfficientNet)")
    k.add_argument("--model", required=True)
    k.add_argument("--dataset", required=True)
    k.add_argument("--rank", type=int)
    k.add_argument("--rank-ratio", type=float)
    k.add_argument("--init")
    k.add_argument("--epochs", type=int)
    k.add_argument("--batch-size", type=int)
    k.add_argument("--lr", type=float)
    k.add_argument("--device", choices=("cpu", "cuda"))
    _submit_common(k)
    k.set_defaults(handler=_run(cmd_submit))

    p = sub.add_parser("sweep", help="rank sweeps on the API: create, watch, list, show, cancel, retry-failed")
    ssub = p.add_subparsers(dest="sweep_command", metavar="ACTION", parser_class=type(p))
    ssub.required = True
    s = ssub.add_parser("create", help="create a sweep: --base spec.json x --grid KEY=V1,V2 x --seeds")
    s.add_argument("--base", required=True, help="JSON file with the base job spec")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a dotted spec path and its values (repeat), e.g. rank=1,2,4 or weights.d=128,256")
    s.add_argument("--seeds", help="comma-separated seeds (default 0)")
    s.add_argument("--name")
    s.add_argument("--early-stopping", help='JSON object or @file.json, e.g. \'{"metric":"val_top1","epochs":[2,4]}\'')
    s.add_argument("--idempotency-key")
    s.add_argument("--watch", action="store_true", help="then watch it until it finishes")
    s.add_argument("--interval", type=float, default=2.0)
    s.add_argument("--timeout", type=float, default=None)
    _conn_args(s, read=True)
    s.set_defaults(handler=_run(cmd_sweep_create))
    s = ssub.add_parser("watch", help="live results table with a progress bar until the sweep finishes")
    s.add_argument("id")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    s.add_argument("--timeout", type=float, default=None)
    _conn_args(s, read=True)
    s.set_defaults(handler=_run(cmd_sweep_watch))
    s = ssub.add_parser("list", help="sweeps, newest first")
    s.add_argument("--limit", type=int, default=50)
    _conn_args(s, read=True)
    s.set_defaults(handler=_run(cmd_sweep_list))
    s = ssub.add_parser("show", help="one sweep: grid, counts, progress")
    s.add_argument("id")
    _conn_args(s, read=True)
    s.set_defaults(handler=_run(cmd_sweep_show))
    s = ssub.add_parser("cancel", help="cancel the sweep's queued and running jobs")
    s.add_argument("id")
    _conn_args(s, read=True)
    s.set_defaults(handler=_run(cmd_sweep_cancel))
    s = ssub.add_parser("retry-failed", help="re-queue the sweep's failed jobs")
    s.add_argument("id")
    s.add_argument("--include-cancelled", action="store_true", help="cancelled jobs too")
    _conn_args(s, read=True)
    s.set_defaults(handler=_run(cmd_sweep_retry))

    p = sub.add_parser("results", help="a sweep's results table: mean/std/min/max/n per grid point over seeds")
    p.add_argument("id")
    p.add_argument("--metric", help="result key (default error; val_top1 for train sweeps)")
    p.add_argument("--group-by", help="comma-separated grid keys (default: all)")
    p.add_argument("--csv", action="store_true", help="print CSV")
    _conn_args(p, read=True)
    p.set_defaults(handler=_run(cmd_results))

    p = sub.add_parser("jobs", help="list jobs on the API (newest first)")
    p.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    p.add_argument("--kind", choices=("approx", "learn", "train"))
    p.add_argument("--sweep", help="jobs of this sweep")
    p.add_argument("--tag")
    p.add_argument("--limit", type=int, default=50, help="jobs per page (1..1000)")
    p.add_argument("--cursor", help="the next page: next_cursor of the previous page (--json) or the hint printed")
    _conn_args(p, read=True)
    p.set_defaults(handler=_run(cmd_jobs))

    for name, fn, helptext in (("cancel", cmd_cancel, "cancel a job"),
                               ("retry", cmd_retry, "re-queue a failed or cancelled job")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id")
        _conn_args(p, read=True)
        p.set_defaults(handler=_run(fn))

    p = sub.add_parser("logs", help="a job's status, metric lines and error text")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new metrics until the job ends")
    p.add_argument("--interval", type=float, default=2.0)
    _conn_args(p, read=True)
    p.set_defaults(handler=_run(cmd_logs))

"""Client commands for sweeps on the REST API (through lowrank.client): sweep create/watch/list/show/cancel/
retry-failed, and results.

    lowrank sweep create --base spec.json --grid rank=1,2,4,8 --grid method=spectral,nkp --seeds 0,1,2
    lowrank sweep create --base spec.json --strategy search --space rank=int:1:32 --space method=spectral,nkp \
        --objective error:min --objective params:min --trials 40 --parallel 4     (lowrank/cli/_search.py)
    lowrank sweep watch ID | list | show ID | cancel ID | retry-failed ID
    lowrank results ID [--metric error] [--group-by rank] [--baseline init=spectral] [--csv]

Options, ids and errors as for the job commands (lowrank/cli/jobs.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lowrank.cli._client import (
    DEFAULT_URL,
    SWEEP_ID,
    client,
    conn_args,
    read_json_file,
    run,
    value,
)
from lowrank.cli._common import CliError, parse_int_list, parse_str_list, print_json


def register(sub) -> None:
    _register_sweep(sub)
    _register_results(sub)


def _parse_grid(items: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key or not text:
            raise CliError(f"--grid must be KEY=V1,V2,... (e.g. rank=1,2,4), got {item!r}")
        if key in grid:
            raise CliError(f"--grid {key} given twice")
        grid[key] = [value(v) for v in parse_str_list(text)]
    return grid


def cmd_sweep_create(args: argparse.Namespace) -> int:
    from lowrank.cli import _search as cli_search

    base = read_json_file(args.base, "--base")
    strategy = cli_search.strategy(args)
    search_body = cli_search.search_body(args) if strategy == "search" else None
    early = None
    if args.early_stopping:
        early = (read_json_file(args.early_stopping[1:], "--early-stopping") if args.early_stopping.startswith("@")
                 else value(args.early_stopping))
        if not isinstance(early, dict):
            raise CliError("--early-stopping must be a JSON object or @file.json")
    seeds = parse_int_list(args.seeds, "--seeds") if args.seeds else None
    with client(args) as c:
        sweep = c.sweep(base, _parse_grid(args.grid) if strategy == "grid" else None, seeds, name=args.name,
                        early_stopping=early, strategy=strategy, search=search_body,
                        idempotency_key=args.idempotency_key)
        if args.watch:
            try:
                sweep = _watch(c, sweep["id"], args.interval, args.timeout, quiet=args.json)
            except KeyboardInterrupt:
                return _interrupted(args, sweep["id"])
    if args.json:
        print_json(sweep)
    elif sweep.get("strategy") == "search":
        print(cli_search.created_line(sweep))
    else:
        print(f"{sweep['id']}  {sweep['total']} jobs ({sweep['n_points']} points x {len(sweep['seeds'])} seeds)")
    return 0


def _progress_line(s: dict[str, Any]) -> str:
    if s.get("strategy") == "search":
        from lowrank.cli._search import progress_line

        return progress_line(s)
    c = s["counts"]
    return (f"{s['status']}: {c['succeeded']} succeeded, {c['failed']} failed, {c['cancelled']} cancelled, "
            f"{c['running']} running, {c['queued']} queued of {s['total']}")


# What the default metrics mean, under the tables that show them (MATH.md Section 1).
METRIC_DOCS = {
    "error": "normalized function error L(W')/L(0) = E||relu(Wx) - relu(W'x)||^2 / E||relu(Wx)||^2, x ~ N(0, I): "
             "0 is exact, 1 is no better than W' = 0",
    "val_top1": "top-1 accuracy on the validation split (0..1)",
}


def _metric_caption(metric: str) -> str:
    doc = METRIC_DOCS.get(metric)
    return f"\n{metric}: {doc}" if doc else ""


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _params_cell(r: dict[str, Any]) -> str:
    """params, or its range when the row pools points of different sizes (never an average)."""
    if r.get("params") is not None:
        return f"{r['params']:.0f}"
    if r.get("params_min") is not None:
        return f"{r['params_min']:.0f}-{r['params_max']:.0f}"
    return "-"


def _results_rich_table(table: dict[str, Any], title: str | None = None):
    from rich.table import Table

    t = Table(title=title, caption=f"mean ± std over seeds (n; no std for n = 1){_metric_caption(table['metric'])}")
    for g in table["group_by"]:
        t.add_column(g)
    for col in ("mean", "std", "min", "max", "n"):
        t.add_column(col, justify="right")
    has_params = any(r.get("params_min") is not None or r.get("params") is not None for r in table["rows"])
    if has_params:
        t.add_column("params", justify="right")
    for r in table["rows"]:
        cells = [str(r["point"][g]) for g in table["group_by"]]
        cells += [_num(r[k]) for k in ("mean", "std", "min", "max")] + [str(r["n"])]
        if has_params:
            cells.append(_params_cell(r))
        t.add_row(*cells)
    return t


def _comparison_rich_table(table: dict[str, Any], title: str | None = None):
    """Each grid point against its baseline partner, paired by seed: estimate and 95% interval."""
    from rich.table import Table

    key, value = table["baseline"]["key"], table["baseline"]["value"]
    ratio = table["comparison"] == "ratio"
    level = f"{100 * table['confidence']:.0f}%"
    how = (f"ratio = {table['metric']} / {table['metric']} at {key}={value}: geometric mean over seeds, "
           f"{level} CI from Student t on the log ratios" if ratio else
           f"difference = {table['metric']} - {table['metric']} at {key}={value}: mean over seeds, "
           f"{level} CI from Student t (n - 1 dof)")
    t = Table(title=title, caption=f"{how}; paired by seed (left out: seeds without a partner); * = the CI "
                                   f"excludes {'1' if ratio else '0'}; means: the point's vs the baseline's"
                                   f"{_metric_caption(table['metric'])}")
    for g in table["grid_keys"]:
        t.add_column(g)
    left_out = any(r["n_unpaired"] + r["n_nonpositive"] for r in table["rows"])
    t.add_column("n", justify="right")
    if left_out:
        t.add_column("left out", justify="right")
    t.add_column("ratio" if ratio else "difference", justify="right")
    t.add_column(f"{level} CI", justify="right", no_wrap=True)
    t.add_column("means", justify="right", no_wrap=True)  # the std is in --json and --csv
    for r in table["rows"]:
        est, lo, hi = ((r["ratio"], r["ratio_ci_low"], r["ratio_ci_high"]) if ratio else
                       (r["mean"], r["ci_low"], r["ci_high"]))
        ci = "-" if lo is None else f"[{lo:.4g}, {hi:.4g}]" + (" *" if r["significant"] else "")
        t.add_row(*(str(r["point"][g]) for g in table["grid_keys"]), str(r["n"]),
                  *([str(r["n_unpaired"] + r["n_nonpositive"])] if left_out else []), _num(est), ci,
                  f"{_num(r['point_mean'])} vs {_num(r['baseline_mean'])}")
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
    print(f"watching sweep {sweep['id']} (Ctrl-C stops watching; the sweep goes on)", file=sys.stderr, flush=True)
    task = bar.add_task(sweep["status"], total=sweep["total"])
    with Live(Group(bar), console=console, refresh_per_second=4, transient=quiet) as live:
        def show(s: dict[str, Any]) -> None:  # after each of the SDK's polls
            nonlocal sweep
            sweep = s
            if s.get("strategy") == "search":  # progress in trials told; the front so far
                from lowrank.cli._search import trials_table

                bar.update(task, completed=s["trials"]["told"], total=s["trials"]["n_trials"], description=s["status"])
                table = trials_table(c.trials(sweep_id, front=True), title=s.get("name") or sweep_id)
            else:
                bar.update(task, completed=sum(s["counts"][k] for k in TERMINAL), description=s["status"])
                table = _results_rich_table(c.results_table(sweep_id), title=s.get("name") or sweep_id)
            live.update(Group(table, Text(_progress_line(s)), bar))

        try:
            return c.wait_sweep(sweep_id, timeout=timeout, poll_s=interval, progress=show)
        except WaitTimeout:
            raise CliError(f"--timeout: sweep {sweep_id} unfinished after {timeout:g} s "
                           f"({_progress_line(sweep)})") from None


def _interrupted(args: argparse.Namespace, sweep_id: str) -> int:
    """Ctrl-C while watching: the sweep is the server's, it runs on; say how to look at it again."""
    url = "" if args.url == os.environ.get("LOWRANK_URL", DEFAULT_URL) else f" --url {args.url}"
    print(f"\nstopped watching; sweep {sweep_id} goes on on the server (lowrank sweep cancel {sweep_id[:8]} "
          f"stops it). Watch it again: lowrank sweep watch {sweep_id[:8]}{url}", file=sys.stderr)
    return 130


def cmd_sweep_watch(args: argparse.Namespace) -> int:
    with client(args) as c:
        sweep_id = c.resolve_sweep_id(args.id)
        try:
            sweep = _watch(c, sweep_id, args.interval, args.timeout, quiet=args.json)
        except KeyboardInterrupt:
            return _interrupted(args, sweep_id)
    if args.json:
        print_json(sweep)
    return 0


def cmd_sweep_list(args: argparse.Namespace) -> int:
    with client(args) as c:
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
    with client(args) as c:
        sweep = c.get_sweep(args.id)
    if args.json:
        print_json(sweep)
        return 0
    print(f"sweep {sweep['id']}  {sweep.get('name') or ''}")
    if sweep.get("strategy") == "search":
        from lowrank.cli._search import show_lines

        print("\n".join(show_lines(sweep)))
        return 0
    print(f"  kind {sweep['kind']}, {sweep['n_points']} points x {len(sweep['seeds'])} seeds = {sweep['total']} jobs")
    print(f"  grid {json.dumps(sweep['grid'])}, seeds {sweep['seeds']}")
    print(f"  {_progress_line(sweep)} ({100 * sweep['progress']:.0f}%)")
    if sweep.get("early_stopping"):
        print(f"  early stopping {json.dumps(sweep['early_stopping'])}")
    return 0


def cmd_sweep_cancel(args: argparse.Namespace) -> int:
    with client(args) as c:
        sweep = c.cancel_sweep(args.id)
    print_json(sweep) if args.json else print(_progress_line(sweep))
    return 0


def cmd_sweep_retry(args: argparse.Namespace) -> int:
    with client(args) as c:
        sweep = c.retry_failed(args.id, include_cancelled=args.include_cancelled)
    print_json(sweep) if args.json else print(_progress_line(sweep))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    group_by = parse_str_list(args.group_by) if args.group_by else None
    if args.comparison and not args.baseline:
        raise CliError("--comparison applies to a paired comparison: give --baseline KEY=VALUE too")
    opts = {"metric": args.metric, "group_by": group_by, "baseline": args.baseline, "comparison": args.comparison}
    with client(args) as c:
        sweep_id = c.resolve_sweep_id(args.id)
        if c.get_sweep(sweep_id).get("strategy") == "search":
            return _search_results(c, sweep_id, args, opts)
        if args.all:
            raise CliError("--all lists a search sweep's trials; this is a grid sweep (its rows are its grid points)")
        if args.csv:
            sys.stdout.write(c.results_csv(sweep_id, **opts))
            return 0
        table = c.results_table(sweep_id, **opts)
    if args.json:
        print_json(table)
        return 0
    from rich.console import Console

    if args.baseline:
        title = f"sweep {sweep_id[:8]}: {table['metric']} versus {table['baseline']['key']}={table['baseline']['value']}"
        Console().print(_comparison_rich_table(table, title=title))
    else:
        Console().print(_results_rich_table(table, title=f"sweep {sweep_id}"))
    return 0


def _search_results(c, sweep_id: str, args: argparse.Namespace, opts: dict[str, Any]) -> int:
    """A search sweep's front (or --all: every trial) as a table, --csv or --json."""
    from lowrank.cli._search import trials_table

    given = [f"--{k.replace('_', '-')}" for k, v in opts.items() if v]
    if given:
        raise CliError(f"{given[0]} is for grid sweeps; a search sweep's results are its trials "
                       "(the front; --all for every trial)")
    if args.csv:
        sys.stdout.write(c.results_csv(sweep_id, front=not args.all))
        return 0
    doc = c.trials(sweep_id, front=not args.all)
    if args.json:
        print_json(doc)
        return 0
    from rich.console import Console

    what = "trials" if args.all else ("front" if len(doc["objectives"]) > 1 else "best trial")
    Console().print(trials_table(doc, title=f"sweep {sweep_id[:8]}: {what}"))
    return 0


# --------------------------------------------------------------------------- registration


def _register_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="rank sweeps on the API: create, watch, list, show, cancel, retry-failed")
    ssub = p.add_subparsers(dest="sweep_command", metavar="ACTION", parser_class=type(p))
    ssub.required = True
    s = ssub.add_parser("create", help="create a sweep: --base spec.json x --grid KEY=V1,V2 x --seeds, or a search "
                                       "(--strategy search --space KEY=RANGE --objective METRIC:min --trials N)")
    s.add_argument("--base", required=True, help="JSON file with the base job spec")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a dotted spec path and its values (repeat), e.g. rank=1,2,4 or weights.d=128,256")
    s.add_argument("--seeds", help="comma-separated seeds (default 0; a search runs each trial once per seed)")
    s.add_argument("--name")
    s.add_argument("--early-stopping", help='JSON object or @file.json, e.g. \'{"metric":"val_top1","epochs":[2,4]}\'')
    s.add_argument("--idempotency-key")
    from lowrank.cli import _search as cli_search

    cli_search.add_arguments(s)
    s.add_argument("--watch", action="store_true", help="then watch it until it finishes")
    s.add_argument("--interval", type=float, default=2.0)
    s.add_argument("--timeout", type=float, default=None)
    conn_args(s, read=True)
    s.set_defaults(handler=run(cmd_sweep_create))
    s = ssub.add_parser("watch", help="live results table with a progress bar until the sweep finishes "
                                      "(Ctrl-C stops watching, not the sweep)")
    s.add_argument("id", help=SWEEP_ID)
    s.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    s.add_argument("--timeout", type=float, default=None)
    conn_args(s, read=True)
    s.set_defaults(handler=run(cmd_sweep_watch))
    s = ssub.add_parser("list", help="sweeps, newest first")
    s.add_argument("--limit", type=int, default=50)
    conn_args(s, read=True)
    s.set_defaults(handler=run(cmd_sweep_list))
    s = ssub.add_parser("show", help="one sweep: grid, counts, progress")
    s.add_argument("id", help=SWEEP_ID)
    conn_args(s, read=True)
    s.set_defaults(handler=run(cmd_sweep_show))
    s = ssub.add_parser("cancel", help="cancel the sweep's queued and running jobs")
    s.add_argument("id", help=SWEEP_ID)
    conn_args(s, read=True)
    s.set_defaults(handler=run(cmd_sweep_cancel))
    s = ssub.add_parser("retry-failed", help="re-queue the sweep's failed jobs")
    s.add_argument("id", help=SWEEP_ID)
    s.add_argument("--include-cancelled", action="store_true", help="cancelled jobs too")
    conn_args(s, read=True)
    s.set_defaults(handler=run(cmd_sweep_retry))


def _register_results(sub) -> None:
    p = sub.add_parser("results", help="a sweep's results table: mean/std/min/max/n per grid point over seeds, "
                                       "or each point versus a baseline point (--baseline); a search sweep's "
                                       "Pareto front (or best trials)")
    p.add_argument("id", help=SWEEP_ID)
    p.add_argument("--metric", help="result key (default error; val_top1 for train sweeps)")
    p.add_argument("--group-by", help="comma-separated grid keys (default: all)")
    p.add_argument("--baseline", metavar="KEY=VALUE",
                   help="compare every other grid point with the point that has this grid value and the same "
                        "other grid values, paired by seed: mean, std, n and 95%% CI (e.g. init=spectral)")
    p.add_argument("--comparison", choices=("difference", "ratio"),
                   help="with --baseline: point - baseline, or point / baseline (CI on the log ratios); "
                        "default ratio for approx/learn errors, difference otherwise")
    p.add_argument("--all", action="store_true", help="search sweeps: every trial, not only the front")
    p.add_argument("--csv", action="store_true", help="print CSV")
    conn_args(p, read=True)
    p.set_defaults(handler=run(cmd_results))

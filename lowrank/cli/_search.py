"""The CLI's search sweeps (lowrank/cli/sweeps.py wires them in): the `search` object from
`lowrank sweep create --strategy search` options, and the front / trials tables.

    lowrank sweep create --base spec.json --strategy search --space rank=int:1:32 --space method=spectral,nkp \\
        --objective error:min --objective params:min --trials 40 --parallel 4 [--seeds 0,1] [--watch]
    lowrank sweep create --base spec.json --search @search.json          # the whole `search` object
    lowrank results ID [--all] [--csv | --json]                          # the front (or every trial)
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from jobs.vocabulary import SWEEP_STRATEGIES
from lowrank.cli._common import CliError, parse_str_list

SEARCH_FLAGS = ("space", "objective", "trials", "parallel", "sampler", "search_seed", "prune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sweep create` that make a search sweep."""
    p.add_argument("--strategy", choices=SWEEP_STRATEGIES, default=None,
                   help="grid: every --grid point; search: trials asked by a sampler over --space "
                        "(default: search when --space or --search is given, else grid)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=DIMENSION",
                   help="a dotted spec path and its range (repeat): int:LOW:HIGH, float:LOW:HIGH (add :log for a "
                        "log scale), or choices V1,V2,... e.g. rank=int:1:32, lr=float:1e-3:0.3:log, method=spectral,nkp")
    p.add_argument("--objective", action="append", default=[], metavar="METRIC:min|max",
                   help="a result metric to minimize or maximize (repeat for a Pareto front), e.g. error:min, "
                        "params:min, val_top1:max")
    p.add_argument("--trials", type=int, help="search: trials in all")
    p.add_argument("--parallel", type=int, help="search: trials queued or running at once (server default 4)")
    p.add_argument("--sampler", choices=("tpe", "nsga2", "random"), help="search: the sampler (server default tpe)")
    p.add_argument("--search-seed", type=int, help="search: seeds the sampler (server default 0)")
    p.add_argument("--prune", metavar="JSON|@FILE",
                   help='search, train sweeps: the pruner, e.g. \'{"metric": "val_top1", "direction": "maximize"}\'')
    p.add_argument("--search", metavar="JSON|@FILE", dest="search_body",
                   help="search: the whole `search` object (space, objectives, n_trials, ...) instead of the options")


def _json_arg(text: str, what: str) -> Any:
    """JSON given inline, or @FILE."""
    if text.startswith("@"):
        from lowrank.cli._client import read_json_file

        return read_json_file(text[1:], what)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{what} must be a JSON object or @file.json: {exc}") from None


def strategy(args: argparse.Namespace) -> str:
    """The sweep's strategy from the options, with one-line errors for mixed ones."""
    given = [f"--{f.replace('_', '-')}" for f in SEARCH_FLAGS if getattr(args, f) not in (None, [])]
    chosen = args.strategy or ("search" if given or args.search_body else "grid")
    if chosen == "grid" and (given or args.search_body):
        raise CliError(f"{(given or ['--search'])[0]} is for search sweeps: add --strategy search")
    if chosen == "search" and args.grid:
        raise CliError("--grid is for grid sweeps; a search sweep's ranges are --space KEY=DIMENSION")
    if chosen == "search" and args.early_stopping:
        raise CliError("--early-stopping is for grid sweeps; a search sweep stops trials with --prune")
    return chosen


def search_body(args: argparse.Namespace) -> dict[str, Any]:
    """The `search` object of the request from --search, or from --space/--objective/--trials/..."""
    from lowrank.client import ClientError, parse_dimension, parse_objective

    if args.search_body:
        body = _json_arg(args.search_body, "--search")
        if not isinstance(body, dict):
            raise CliError("--search must be a JSON object (space, objectives, n_trials, ...) or @file.json")
        flags = [f"--{f.replace('_', '-')}" for f in SEARCH_FLAGS if getattr(args, f) not in (None, [])]
        if flags:
            raise CliError(f"give the search either as --search or as options, not both ({flags[0]})")
        return body
    if not args.space:
        raise CliError("a search sweep needs --space KEY=DIMENSION (e.g. rank=int:1:32) or --search @file.json")
    space: dict[str, Any] = {}
    try:
        for item in args.space:
            key, eq, text = item.partition("=")
            if not eq or not key or not text:
                raise CliError(f"--space must be KEY=DIMENSION (e.g. rank=int:1:32 or method=spectral,nkp), "
                               f"got {item!r}")
            if key in space:
                raise CliError(f"--space {key} given twice")
            kind = text.split(":")[0]
            space[key] = parse_dimension(key, text if kind in ("int", "float") else
                                         [_choice(v) for v in parse_str_list(text)])
        objectives = [parse_objective(o) for o in args.objective]
    except ClientError as exc:
        raise CliError(str(exc)) from None
    if not objectives:
        raise CliError("a search sweep needs --objective METRIC:min|max (e.g. error:min)")
    if args.trials is None:
        raise CliError("a search sweep needs --trials N (the trial budget)")
    body: dict[str, Any] = {"space": space, "objectives": objectives, "n_trials": args.trials}
    for flag, key in (("parallel", "parallelism"), ("sampler", "sampler"), ("search_seed", "seed")):
        if getattr(args, flag) is not None:
            body[key] = getattr(args, flag)
    if args.prune:
        body["pruner"] = _json_arg(args.prune, "--prune")
    return body


def _choice(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def created_line(sweep: dict[str, Any]) -> str:
    s = sweep["search"]
    return (f"{sweep['id']}  search: {s['n_trials']} trials, {s['parallelism']} at once, "
            f"{len(sweep['seeds'])} seed(s) per trial")


def progress_line(sweep: dict[str, Any]) -> str:
    t = sweep["trials"]
    return (f"{sweep['status']}: {t['told']} of {t['n_trials']} trials told ({t['complete']} complete, "
            f"{t['pruned']} pruned, {t['failed']} failed), {t['running']} running")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v)


def trials_table(doc: dict[str, Any], title: str | None = None):
    """The front (or every trial): number, the space keys, the objectives, state, and why not complete."""
    from rich.table import Table

    metrics = [o["metric"] for o in doc["objectives"]]
    arrows = ", ".join(f"{o['metric']} {'min' if o['direction'] == 'minimize' else 'max'}" for o in doc["objectives"])
    front = len(doc["objectives"]) > 1
    shown = len(doc["rows"])
    caption = (f"{'Pareto front' if front else 'best trial(s)'} of {doc['counts']['complete']} complete trials "
               f"({arrows}); values: mean over each trial's seeds; * = on the front")
    t = Table(title=title, caption=caption)
    t.add_column("trial", justify="right")
    for k in doc["space_keys"]:
        t.add_column(k)
    for k in metrics:
        t.add_column(k, justify="right")
    t.add_column("state")
    for r in doc["rows"]:
        values = r["values"] or {}
        state = r["state"] + (" *" if r["on_front"] else "")
        if r["state"] != "complete" and r.get("reason"):
            state += f": {r['reason'][:80]}"
        t.add_row(str(r["number"]), *(_cell(r["point"].get(k)) for k in doc["space_keys"]),
                  *(_cell(values.get(k)) for k in metrics), state)
    if not shown:
        t.add_row(*(["-"] * (2 + len(doc["space_keys"]) + len(metrics) - 1)), "no complete trial yet")
    return t


def show_lines(sweep: dict[str, Any]) -> list[str]:
    """`lowrank sweep show` of a search sweep."""
    s = sweep["search"]
    objectives = ", ".join(f"{o['metric']} {'min' if o['direction'] == 'minimize' else 'max'}"
                           for o in s["objectives"])
    lines = [f"  kind {sweep['kind']}, search ({s['sampler']}, seed {s['seed']}): {s['n_trials']} trials, "
             f"{s['parallelism']} at once, seeds {sweep['seeds']} per trial",
             f"  space {json.dumps(s['space'])}", f"  objectives {objectives}"]
    if s.get("pruner"):
        lines.append(f"  pruner {json.dumps(s['pruner'])}")
    lines.append(f"  {progress_line(sweep)} ({100 * sweep['progress']:.0f}%)")
    return lines

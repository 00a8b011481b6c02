"""Client commands for jobs on the REST API (through lowrank.client): submit, jobs, job, cancel, retry, logs.

    lowrank submit approx --m 4096 --d 512 --rank 8 --method nkp [--wait]
    lowrank submit train --model resnet18 --dataset digits --rank-ratio 0.25 --init nkp
    lowrank submit compress --source-job ID --method whiten --budget 0.25 [--finetune-epochs 1]  (_compress_submit.py)
    lowrank submit latency --model resnet18 --rank-ratio 0.25 --image-size 32 --batch 1,8 | --source COMPRESS_JOB
    lowrank jobs [--status running] / lowrank job ID / lowrank cancel ID / lowrank retry ID / lowrank logs ID [--follow]

Every command takes --url and --token (default $LOWRANK_URL, $LOWRANK_TOKEN); read commands take
--json. An ID may be a unique prefix (the 8 characters tables show). Errors (HTTP 4xx/5xx, server
unreachable, an unknown or ambiguous id) are one line on stderr and exit code 2. Sweeps and results:
lowrank/cli/sweeps.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from core.names import APPROX_METHODS  # torch-free
from jobs.vocabulary import JOB_KINDS, JOB_STATUSES, PRIORITIES
from lowrank.cli import _compress_submit
from lowrank.cli import latency as _latency
from lowrank.cli._client import (
    JOB_ID,
    client,
    conn_args,
    one_line,
    print_warnings,
    result_line,
    run,
    value,
)
from lowrank.cli._common import CliError, print_json


def register(sub) -> None:
    _register_submit(sub)
    _register_reads(sub)


def _set_path(spec: dict[str, Any], key: str, value: Any) -> None:
    node = spec
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CliError(f"--set {key}: {part} is not an object")
    node[parts[-1]] = value


def _submit_common(p: argparse.ArgumentParser) -> None:
    conn_args(p, read=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--tag", action="append", default=None, help="a tag (repeat)")
    p.add_argument("--priority", choices=PRIORITIES, default=None)
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
    elif kind == "compress":
        spec.update(_compress_submit.spec_fields(args))
    elif kind == "latency":
        spec.update(_latency.spec_fields(args))
    else:
        for f in ("model", "dataset", "recipe", "rank", "rank_ratio", "init", "epochs", "batch_size", "lr", "device"):
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
        _set_path(spec, key, value(text))
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    with client(args) as c:
        if "job" in (spec.get("source") or {}):  # compress: the source job's id may be a prefix
            spec["source"]["job"] = c.resolve_job_id(str(spec["source"]["job"]))
        if spec["kind"] == "latency" and isinstance(spec.get("source"), str):  # latency: the compress job's
            spec["source"] = c.resolve_job_id(spec["source"])
        job = c.submit(spec)
        if args.wait:
            job = c.wait(job["id"], timeout=args.timeout)
    if args.json:
        print_json(job)
    else:
        print(job["id"] if not args.wait else f"{job['id']} {job['status']}")
        if args.wait and job["status"] == "succeeded" and job.get("result"):
            print("  " + result_line(job["result"]))
            if job["kind"] == "latency":
                _latency.print_tables(job["result"])
        elif args.wait and job.get("error"):
            print("  " + one_line(job["error"])[:300])
    if args.wait:
        print_warnings(job)
    return 0 if (not args.wait or job["status"] == "succeeded") else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    with client(args) as c:
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


def cmd_job(args: argparse.Namespace) -> int:
    """One job: status, where it ran, its spec's main fields, its result or error, warnings."""
    with client(args) as c:
        job = c.job(args.id)
    if args.json:
        print_json(job)
        print_warnings(job)
        return 0
    print(f"job {job['id']} ({job['kind']}) {job['status']}" + (f"  {job['name']}" if job.get("name") else ""))
    if job.get("sweep_id"):
        print(f"  sweep {job['sweep_id']} point {json.dumps(job.get('sweep_point'))} seed {job['seed']}")
    print(f"  worker {job.get('worker') or '-'}, attempts {job['attempts']}, created {job['created_at'][:19]}"
          + (f", finished {job['finished_at'][:19]}" if job.get("finished_at") else ""))
    print(f"  spec {json.dumps(job['spec'], default=str)[:2000]}")
    if job.get("error"):
        print("  error: " + one_line(job["error"])[:2000])
    elif job.get("result"):
        print("  result: " + (result_line(job["result"]) or json.dumps(job["result"], default=str)[:500]))
        if job["kind"] == "latency" and job["status"] == "succeeded":
            _latency.print_tables(job["result"])
    print_warnings(job)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with client(args) as c:
        job = c.cancel(args.id)
    print_json(job) if args.json else print(f"{job['id']} {job['status']}"
                                            + (" (cancel requested)" if job["status"] == "running" else ""))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with client(args) as c:
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

    with client(args) as c:
        job_id = c.resolve_job_id(args.id)
        job = c.job(job_id)
        metrics = c.metrics(job_id, max_points=100_000)
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
            job = c.job(job_id)
            lines, last = _metric_lines(c.metrics(job_id, max_points=100_000)["series"], last)
            for line in lines:
                print(line, flush=True)
        if args.follow:
            print(f"job {job['id']} {job['status']}")
        if job.get("error"):
            print(job["error"])
        elif job.get("result") and job["status"] == "succeeded":
            print("result " + json.dumps(job["result"], default=str)[:2000])
    print_warnings(job)
    return 0


# --------------------------------------------------------------------------- registration


def _register_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit one job to the API (approx | learn | train | compress | latency)")
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
            k.add_argument("--method", choices=APPROX_METHODS)
        else:
            k.add_argument("--eps", type=float)
            k.add_argument("--delta", type=float)
            k.add_argument("--noise", type=float)
        _submit_common(k)
        k.set_defaults(handler=run(cmd_submit))
    k = ksub.add_parser("train", help="a training job (factored ResNet / EfficientNet)")
    k.add_argument("--model", required=True)
    k.add_argument("--dataset", required=True)
    k.add_argument("--recipe", help="training recipe (`lowrank recipes`; default: the data set's)")
    k.add_argument("--rank", type=int)
    k.add_argument("--rank-ratio", type=float)
    k.add_argument("--init")
    k.add_argument("--epochs", type=int)
    k.add_argument("--batch-size", type=int)
    k.add_argument("--lr", type=float)
    k.add_argument("--device", choices=("cpu", "cuda"))
    _submit_common(k)
    k.set_defaults(handler=run(cmd_submit))
    _compress_submit.register_submit(ksub, _submit_common, run(cmd_submit))
    k = ksub.add_parser("latency", help="measured forward latency, dense vs factored (`lowrank latency`'s flags)")
    _latency.add_measure_flags(k, job=True)
    _submit_common(k)
    k.set_defaults(handler=run(cmd_submit))


def _register_reads(sub) -> None:
    p = sub.add_parser("jobs", help="list jobs on the API (newest first)")
    p.add_argument("--status", choices=JOB_STATUSES)
    p.add_argument("--kind", choices=JOB_KINDS)
    p.add_argument("--sweep", help="jobs of this sweep (its id or a unique prefix)")
    p.add_argument("--tag")
    p.add_argument("--limit", type=int, default=50, help="jobs per page (1..1000)")
    p.add_argument("--cursor", help="the next page: next_cursor of the previous page (--json) or the hint printed")
    conn_args(p, read=True)
    p.set_defaults(handler=run(cmd_jobs))

    for name, fn, helptext in (("job", cmd_job, "one job: status, spec, result or error, warnings"),
                               ("cancel", cmd_cancel, "cancel a job"),
                               ("retry", cmd_retry, "re-queue a failed or cancelled job")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id", help=JOB_ID)
        conn_args(p, read=True)
        p.set_defaults(handler=run(fn))

    p = sub.add_parser("logs", help="a job's status, metric lines and error text")
    p.add_argument("id", help=JOB_ID)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new metrics until the job ends")
    p.add_argument("--interval", type=float, default=2.0)
    conn_args(p, read=True)
    p.set_defaults(handler=run(cmd_logs))

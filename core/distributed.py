"""Multi-GPU training of one job on one node: DistributedDataParallel under torchrun.

`train(config)` with `config.devices = N > 1` calls `launch`, which runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m core.distributed \\
        --config CONFIG.json --events EVENTS.jsonl --stop-file STOP [--checkpoint-dir DIR] [--resume]

and relays what rank 0 reports (metrics, progress, the summary) to the caller's callbacks, and
the caller's `should_stop()` to rank 0 (by creating the stop file; rank 0 broadcasts it to every
rank between steps). Each rank: backend `nccl` on CUDA (GPU = LOCAL_RANK), `gloo` on CPU; a
DistributedSampler shards the training set; metrics, callbacks and checkpoints come from rank 0.
The same module entry point can be started by hand (or by a Slurm script) under torchrun; the
events file and stop file are then optional.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.guards import TrainingDiverged
from core.run_context import TrainCallbacks, TrainingCancelled

if TYPE_CHECKING:
    from core.train import TrainConfig


class _FileCallbacks(TrainCallbacks):
    """Rank 0's callbacks in a torchrun job: JSON lines to the events file; stop when the stop file exists."""

    def __init__(self, events: str | None, stop_file: str | None) -> None:
        self.events, self.stop_file = events, stop_file

    def emit(self, event: dict[str, Any]) -> None:
        if self.events is None:
            print(json.dumps(event), flush=True)
            return
        with open(self.events, "a") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()

    def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.emit({"kind": "metrics", "step": step, "epoch": epoch, "metrics": metrics})

    def on_progress(self, frac: float) -> None:
        self.emit({"kind": "progress", "frac": frac})

    def should_stop(self) -> bool:
        return self.stop_file is not None and os.path.exists(self.stop_file)


def launch(config: TrainConfig, *, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
           callbacks: TrainCallbacks | None = None, poll_s: float = 0.2) -> dict[str, Any]:
    """Run `config` on `config.devices` processes under torchrun; return rank 0's summary.

    Raises TrainingCancelled when `callbacks.should_stop()` stopped it, TrainingDiverged with rank 0's
    message when the loss diverged, ValueError for a bad
    config reported by a rank, RuntimeError (with the log's tail) when the processes failed.
    """
    callbacks = callbacks or TrainCallbacks()
    n = config.devices
    if config.device != "cpu" and torch.cuda.is_available() and n > torch.cuda.device_count():
        raise ValueError(f"devices: {n} processes asked, only {torch.cuda.device_count()} GPU(s) visible")
    with tempfile.TemporaryDirectory(prefix="lowrank-ddp-") as tmp:
        tmpdir = Path(tmp)
        cfg_path, events, stop, summary_path, log_path = (
            tmpdir / "config.json", tmpdir / "events.jsonl", tmpdir / "stop", tmpdir / "summary.json",
            tmpdir / "torchrun.log")
        cfg_path.write_text(json.dumps(config.to_dict()))
        events.touch()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "core.distributed", "--config", str(cfg_path), "--events", str(events),
               "--stop-file", str(stop), "--summary", str(summary_path)]
        if checkpoint_dir is not None:
            cmd += ["--checkpoint-dir", str(checkpoint_dir)]
        if resume:
            cmd.append("--resume")
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        offset = 0
        outcome: dict[str, Any] = {}

        def drain() -> None:
            nonlocal offset
            with open(events) as fh:
                fh.seek(offset)
                chunk = fh.read()
            complete = chunk[:chunk.rfind("\n") + 1]
            offset += len(complete.encode())
            for line in complete.splitlines():
                event = json.loads(line)
                kind = event["kind"]
                if kind == "metrics":
                    callbacks.on_metrics(event["step"], event["epoch"], event["metrics"])
                elif kind == "progress":
                    callbacks.on_progress(event["frac"])
                else:
                    outcome[kind] = event

        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    drain()
                    if not stop.exists() and callbacks.should_stop():
                        stop.touch()
                    time.sleep(poll_s)
                drain()
            finally:
                if proc.poll() is None:  # the caller raised: take the ranks down with us
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if "cancelled" in outcome:
            raise TrainingCancelled(outcome["cancelled"]["message"])
        if "diverged" in outcome:
            raise TrainingDiverged(outcome["diverged"]["message"])
        if "error" in outcome:
            raise ValueError(outcome["error"]["message"])
        if proc.returncode != 0 or not summary_path.exists():
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"torchrun with {n} processes failed (exit {proc.returncode}):\n{tail}")
        return json.loads(summary_path.read_text())


def main(argv: list[str] | None = None) -> int:
    """One rank of a torchrun job (see the module docstring). Exit 0 ok, 2 bad config, 3 cancelled or diverged."""
    import torch.distributed as dist

    from core.train import TrainConfig, resolve_device, train  # the rank runs the trainer

    parser = argparse.ArgumentParser(prog="python -m core.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON file of TrainConfig keys")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--events", help="rank 0 appends JSON lines here (default: stdout)")
    parser.add_argument("--stop-file", help="the job stops (TrainingCancelled) once this file exists")
    parser.add_argument("--summary", help="rank 0 writes the summary JSON here")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    callbacks = _FileCallbacks(args.events, args.stop_file) if rank == 0 else TrainCallbacks()
    try:
        config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        device = resolve_device(config, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except ValueError as exc:
        if rank == 0:
            callbacks.emit({"kind": "error", "message": str(exc)})
        return 2

    def leave_together() -> None:
        # Tearing gloo down while a peer is still in a collective aborts the process ("terminate
        # called without an active exception"), so ranks that are in step leave together.
        dist.barrier()
        dist.destroy_process_group()

    try:
        summary = train(config, checkpoint_dir=args.checkpoint_dir, resume=args.resume, callbacks=callbacks)
    except (TrainingCancelled, TrainingDiverged) as exc:  # every rank raises at the same step (rank 0's flag)
        if rank == 0:
            kind = "cancelled" if isinstance(exc, TrainingCancelled) else "diverged"
            callbacks.emit({"kind": kind, "message": str(exc)})
        leave_together()
        return 3
    except ValueError as exc:
        # A rank-local failure: exit without waiting for the others; torchrun stops them.
        if rank == 0:
            callbacks.emit({"kind": "error", "message": str(exc)})
        return 2
    if rank == 0 and args.summary:
        tmp = Path(args.summary + ".tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, args.summary)
    leave_together()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's finalization: gloo's C++ threads can still hold work objects
    # whose tensors need the GIL while the interpreter is torn down, which aborts the rank (SIGABRT,
    # "terminate called without an active exception") after it finished, seen once in CI on a loaded
    # 2-core machine. Everything the rank writes is already closed (events, summary) or flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

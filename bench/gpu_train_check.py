"""GPU check for factored training (issue 3): run on a machine with a CUDA device, never in CI.

    python bench/gpu_train_check.py [--out DIR] [--images 3840] [--batch 128] [--amp bf16]

1. Compute throughput of ResNet-50 at 224 px (forward + backward + SGD step on a fixed batch
   already on the GPU, AMP + channels-last): dense versus factored at rank ratio 0.25.
2. One epoch end to end through `core.train.train` on synthetic 224 px data (DataLoader worker
   processes, AMP, channels-last): dense versus factored with NKP init; images/s as train()
   reports it, wall time, and the factorize time.
3. The CUDA tests of tests/core (AMP bf16/fp16 and channels-last training steps).

Prints one JSON object and writes it, with a markdown table, under --out (default: $OUT when
set, else docs/results/): train_gpu.json and train_gpu.md. Budget: about 3-5 minutes on one H100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# After the sys.path line above: the script runs as a file on a GPU node, without the package installed.
from core.factorize import factorize_model  # noqa: E402 - see above
from core.models import build_model, count_macs, count_params  # noqa: E402 - see above
from core.train import train  # noqa: E402 - see above


def compute_throughput(ratio: float | None, batch: int, amp: str, steps: int = 20) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=1000)
    if ratio is not None:
        factorize_model(model, rank_ratio=ratio, method="spectral", compare_spectral=False)
    params, macs = count_params(model), count_macs(model)
    model = model.cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"images_per_s": batch * steps / (time.perf_counter() - t0), "params": params, "macs": macs,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def epoch(ratio: float | None, images: int, batch: int, amp: str) -> dict:
    cfg = dict(model="resnet50", dataset="synthetic", num_classes=100, image_size=224,
               synthetic_train_size=images, synthetic_val_size=min(1024, images), epochs=1, batch_size=batch,
               lr=0.1, warmup_epochs=0.2, amp=amp, channels_last=True, device="cuda",
               num_workers=min(8, os.cpu_count() or 1), log_every=10, init="dense")
    if ratio is not None:
        cfg.update(rank_ratio=ratio, init="nkp")
    t0 = time.perf_counter()
    s = train(cfg)
    return {"images_per_s": s["history"][-1]["images_per_s"], "epoch_time_s": s["wall_time_s"],
            "total_s": time.perf_counter() - t0, "val_top1": s["val_top1"],
            "factorize_s": (s["init_totals"] or {}).get("time_s"), "device": s["device"],
            "params": s["params_factored"], "macs": s["macs_factored"]}


def write_report(result: dict, out: Path) -> None:
    """train_gpu.json and train_gpu.md under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpu.json").write_text(json.dumps(result, indent=1))
    c, e = result["compute"], result["epoch"]
    md = [f"# Factored ResNet-50 on {result['device']} (torch {result['torch']}, AMP {result['amp']}, "
          f"channels-last, batch {result['batch']})", "",
          "| variant | params | MACs / image | compute images/s | epoch images/s (train()) | epoch s | factorize s |",
          "|---|---|---|---|---|---|---|"]
    for label, ck, ek in (("dense", "dense", "dense"), ("factored 0.25 (NKP)", "factored_0.25", "factored_0.25_nkp")):
        f = e[ek]["factorize_s"]
        md.append(f"| {label} | {c[ck]['params'] / 1e6:.1f} M | {c[ck]['macs'] / 1e9:.2f} G | "
                  f"{c[ck]['images_per_s']:.0f} | {e[ek]['images_per_s']:.0f} | {e[ek]['epoch_time_s']:.1f} | "
                  f"{'-' if f is None else f'{f:.1f}'} |")
    md.append("")
    md.append(f"Factored / dense compute throughput: "
              f"{c['factored_0.25']['images_per_s'] / c['dense']['images_per_s']:.2f}x.")
    if "cuda_tests" in result:
        tail = result["cuda_tests"]["tail"].strip()
        md.append(f"CUDA tests: exit {result['cuda_tests']['returncode']}: {tail.splitlines()[-1] if tail else ''}")
    (out / "train_gpu.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "docs" / "results"))
    parser.add_argument("--images", type=int, default=128 * 30, help="synthetic training images per epoch")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--amp", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train_check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "amp": args.amp,
                    "batch": args.batch}
    result["compute"] = {"dense": compute_throughput(None, args.batch, args.amp),
                         "factored_0.25": compute_throughput(0.25, args.batch, args.amp)}
    print(json.dumps(result["compute"]), flush=True)
    result["epoch"] = {"dense": epoch(None, args.images, args.batch, args.amp),
                       "factored_0.25_nkp": epoch(0.25, args.images, args.batch, args.amp)}
    print(json.dumps(result["epoch"]), flush=True)
    if not args.skip_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda_amp or cuda_ddp",
                               "tests/core/test_train.py"], cwd=ROOT, capture_output=True, text=True)
        result["cuda_tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-1500:]}

    write_report(result, Path(args.out))
    print(json.dumps(result, indent=1))
    return 0 if result.get("cuda_tests", {"returncode": 0})["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

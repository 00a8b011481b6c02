"""GPU speed check (issue 17): run on a machine with a CUDA device, never in CI; prints everything it measures.

    python bench/gpu_speed_check.py [--out DIR] [--quick] [--with-train-check] [--with-smoke]

1. Latency on CUDA through the shipped path (`core.latency.compare_latency`, what `lowrank latency
   --device cuda` runs): ResNet-18 / ResNet-50 / EfficientNet-B0 at 224 px, rank ratios 0.1 / 0.25 /
   0.5, batch 1 and 64, channels-last, synchronized after warm-up; dense, factored and latency-aware
   factored end to end, and per factored layer at batch 1.
2. NKP / spectral time on CUDA (`core.approx.approximate(..., device="cuda")`): 4096 x 4096 at r = 16
   and 256, interleaved, the faster of two runs each.
3. Optionally the GPU scripts that exist: bench/gpu_train_check.py (--with-train-check) and
   deploy/gpu_smoke.py (--with-smoke), run as subprocesses, their output tails recorded.

Writes speed_gpu.json and speed_gpu.md under --out (default: $OUT when set, else docs/results/), each
naming the device. Budget: about 3-6 minutes on one H100/H200 (--quick: ResNet-18 and 50 at 0.25 only).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.approx import approximate  # noqa: E402
from core.latency import compare_latency  # noqa: E402
from core.weights import gaussian_weights  # noqa: E402


def latency_tables(quick: bool) -> list[dict]:
    models = ["resnet18", "resnet50"] if quick else ["resnet18", "resnet50", "efficientnet_b0"]
    ratios = [0.25] if quick else [0.1, 0.25, 0.5]
    out = []
    for name in models:
        for ratio in ratios:
            t0 = time.perf_counter()
            res = compare_latency(name, rank_ratio=ratio, image_size=224, batches=[1, 64], device="cuda",
                                  channels_last=True, repeats=30, latency_aware=True, latency_batch=1,
                                  layer_batches=[1], num_classes=1000)
            res["wall_s"] = time.perf_counter() - t0
            e2e = {(e["batch"], e["variant"]): e for e in res["latency"]["end_to_end"]}
            print(json.dumps({"model": name, "ratio": ratio, **{f"b{b}_{v}_ms": round(e["timing"]["p50_ms"], 4)
                                                                 for (b, v), e in e2e.items()},
                              "kept_dense": len(res["kept_dense"])}), flush=True)
            out.append(res)
    return out


def nkp_vs_spectral(n: int = 4096) -> list[dict]:
    W = gaussian_weights(n, n, seed=0).cuda()
    approximate(W[:64, :64], 4, "nkp")
    approximate(W[:64, :64], 4, "spectral")
    rows = []
    for r in (16, 256):
        times: dict[str, list[float]] = {"spectral": [], "nkp": []}
        errors = {}
        for _ in range(2):
            for method in ("spectral", "nkp"):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                a = approximate(W, r, method)
                torch.cuda.synchronize()
                times[method].append(time.perf_counter() - t0)
                errors[method] = a.error
        row = {"n": n, "r": r, "spectral_s": min(times["spectral"]), "nkp_s": min(times["nkp"]), "runs": times,
               "errors": errors}
        row["ratio"] = row["nkp_s"] / row["spectral_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_script(argv: list[str], timeout: int) -> dict:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", flush=True)
    return {"argv": argv, "returncode": proc.returncode, "tail": proc.stdout[-3000:], "stderr_tail": proc.stderr[-2000:]}


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    md = [f"# Speed on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})", "",
          "## Forward latency, end to end (224 px, channels-last, p50 ms of 30 synchronized samples)", "",
          "| model | ratio | batch | dense | factored | latency-aware | factored speed-up | latency-aware speed-up | "
          "kept dense |", "|---|---|---|---|---|---|---|---|---|"]
    for res in result["latency"]:
        e2e = {(e["batch"], e["variant"]): e for e in res["latency"]["end_to_end"]}
        for b in res["batches"]:
            d, f, a = e2e[(b, "dense")], e2e[(b, "factored")], e2e[(b, "latency-aware")]
            md.append(f"| {res['model']} | {res['rank_ratio']} | {b} | {d['timing']['p50_ms']:.3f} | "
                      f"{f['timing']['p50_ms']:.3f} | {a['timing']['p50_ms']:.3f} | {f['speedup']:.2f}x | "
                      f"{a['speedup']:.2f}x | {len(res['kept_dense'])} |")
    md += ["", "## NKP / spectral time on CUDA", "", "| matrix | r | spectral s | NKP s | ratio |", "|---|---|---|---|---|"]
    for r in result["nkp_vs_spectral"]:
        md.append(f"| {r['n']} x {r['n']} | {r['r']} | {r['spectral_s']:.3f} | {r['nkp_s']:.3f} | {r['ratio']:.2f}x |")
    for key in ("train_check", "smoke"):
        if key in result:
            md.append(f"\n{key}: exit {result[key]['returncode']}")
    (out / "speed_gpu.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "docs" / "results"))
    parser.add_argument("--quick", action="store_true", help="ResNet-18 and ResNet-50 at ratio 0.25 only")
    parser.add_argument("--with-train-check", action="store_true", help="also run bench/gpu_train_check.py")
    parser.add_argument("--with-smoke", action="store_true", help="also run deploy/gpu_smoke.py")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_speed_check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps(result), flush=True)
    result["latency"] = latency_tables(args.quick)
    result["nkp_vs_spectral"] = nkp_vs_spectral()
    if args.with_train_check:
        result["train_check"] = run_script(["bench/gpu_train_check.py", "--out", args.out, "--skip-tests"], 900)
    if args.with_smoke:
        result["smoke"] = run_script(["deploy/gpu_smoke.py"], 600)
    write_report(result, Path(args.out))
    print(json.dumps({k: v for k, v in result.items() if k != "latency"}, indent=1, default=str))
    return 0 if all(result.get(k, {"returncode": 0})["returncode"] == 0 for k in ("train_check", "smoke")) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measured latency (core/latency.py) and latency-aware factorization (issue 17).

Timing on a loaded shared machine: the comparisons below are between things 2x to 50x apart and
measured interleaved (core.latency.time_paired), so load lands on both sides alike; nothing asserts an
absolute time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from core.factorize import FactorizeError, factorize_model
from core.latency import (
    LatencyCallbacks,
    LatencyCancelled,
    LatencyPolicy,
    compare_latency,
    factorize_with_ranks,
    layer_input_shapes,
    measure_latency,
    time_paired,
)
from core.layers import FactoredLinear
from core.models import build_model

LOWRANK = [sys.executable, "-m", "lowrank"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


class BigAndTiny(nn.Module):
    """A 1024 x 1024 linear (factored at rank 8: 64x fewer multiply-adds, measured 3-6x faster at batch 1)
    and a 4 x 4 one (factored at rank 3: two calls where there was one, measured ~2x slower)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1024, 1024)
        self.squeeze = nn.Linear(1024, 4)
        self.tiny = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiny(torch.relu(self.squeeze(torch.relu(self.big(x.flatten(1)[:, :1024])))))


def test_latency_aware_keeps_the_slower_tiny_layer_dense_and_factors_the_big_one():
    torch.manual_seed(0)
    model = BigAndTiny()
    policy = LatencyPolicy(image_size=32, batch=1, threads=1)
    report = factorize_model(model, rank=8, method="spectral", include=["big", "tiny"], latency=policy,
                             always_factor=True)
    rows = {r.layer: r for r in report.layers}
    big, tiny = rows["big"], rows["tiny"]
    assert big.status == "factored" and big.dense_ms > big.factored_ms, big
    assert isinstance(model.big, FactoredLinear) and model.big.rank == 8
    assert tiny.status == "kept_dense", tiny
    assert tiny.factored_ms >= tiny.dense_ms
    assert tiny.reason.startswith("factored not faster on cpu:") and "batch 1" in tiny.reason, tiny.reason
    assert type(model.tiny) is nn.Linear and tiny.params_factored == tiny.params_dense
    assert rows["squeeze"].status == "skipped" and rows["squeeze"].dense_ms is None
    assert report.totals["layers_kept_dense"] == 1 and report.totals["layers_factored"] == 1
    assert report.latency == {"image_size": 32, "batch": 1, "device": "cpu", "threads": 1, "channels_last": False,
                              "repeats": 30, "min_speedup": 1.0}
    assert json.loads(json.dumps(report.to_dict()))["layers"][2]["status"] == "kept_dense"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # Without a policy both are factored: the policy alone made the difference.
    plain = factorize_model(BigAndTiny(), rank=8, method="spectral", include=["big", "tiny"], always_factor=True)
    assert [r.status for r in plain.layers if r.layer in ("big", "tiny")] == ["factored", "factored"]
    assert all(r.dense_ms is None for r in plain.layers) and plain.latency is None


def test_min_speedup_demands_a_margin():
    """A 50x margin no factored layer here reaches keeps both dense, with the margin in the reason."""
    model = BigAndTiny()
    policy = LatencyPolicy(image_size=32, batch=1, threads=1, min_speedup=50.0, repeats=5)
    report = factorize_model(model, rank=8, method="random", include=["big", "tiny"], latency=policy,
                             always_factor=True)
    kept = [r for r in report.layers if r.status == "kept_dense"]
    assert [r.layer for r in kept] == ["big", "tiny"]
    assert "needs 50x" in kept[0].reason and type(model.big) is nn.Linear


def test_time_paired_orders_slow_and_fast_and_reports_percentiles():
    a, b = torch.randn(256, 256), torch.randn(24, 24)
    slow, fast = time_paired([lambda: a @ a, lambda: b @ b], repeats=9, warmup=1)
    assert slow.samples == fast.samples == 9
    assert slow.p50_ms > 5 * fast.p50_ms, (slow, fast)  # ~1200x the multiply-adds
    assert fast.p50_ms <= fast.p90_ms and slow.p50_ms <= slow.p90_ms
    assert slow.throughput(4) == pytest.approx(4 / (slow.p50_ms / 1000))


def test_layer_input_shapes_restore_training_mode_and_batch_norm_statistics():
    torch.manual_seed(0)
    model = build_model("resnet18", small_input=True).train()
    before = model.bn1.running_mean.clone()
    shapes = layer_input_shapes(model, ["layer1.0.conv1", "layer4.1.conv2", "fc", "layer2.0.downsample.0"],
                                image_size=32, batch=5)
    assert shapes == {"layer1.0.conv1": (5, 64, 32, 32), "layer4.1.conv2": (5, 512, 4, 4), "fc": (5, 512),
                      "layer2.0.downsample.0": (5, 64, 32, 32)}
    assert model.training and model.layer3[0].bn1.training
    assert torch.equal(model.bn1.running_mean, before)


def test_measure_latency_end_to_end_and_per_layer_contract():
    torch.manual_seed(0)
    dense = build_model("resnet18", small_input=True)
    factored = build_model("resnet18", small_input=True)
    factored.load_state_dict(dense.state_dict())
    rep = factorize_model(factored, rank_ratio=0.25, method="random", include=["layer4.1.conv2", "layer1.0.conv1"])
    report = measure_latency(dense, {"factored": factored}, image_size=16, batches=[1, 2], threads=1, repeats=3)
    assert report.threads == 1 and report.device == "cpu" and report.channels_last is False
    assert [(e["batch"], e["variant"]) for e in report.end_to_end] == [
        (1, "dense"), (1, "factored"), (2, "dense"), (2, "factored")]
    assert all(e["speedup"] == 1.0 for e in report.end_to_end if e["variant"] == "dense")
    layers = report.layers[2]
    assert [r.layer for r in layers] == ["layer1.0.conv1", "layer4.1.conv2"]
    ranks = {r.layer: r.rank for r in rep.factored()}
    assert layers[1].input_shape == [2, 512, 2, 2] and layers[1].rank == ranks["layer4.1.conv2"] == 128
    assert all(r.dense.samples == 3 for r in layers)
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d["layers"]) == {"1", "2"} and d["layers"]["1"][0]["speedup"] > 0


def test_policy_settings_are_checked_and_named():
    for kwargs, pattern in (({"batch": 0}, "latency batch must be an integer >= 1"),
                            ({"image_size": "32"}, "latency image_size must be an integer"),
                            ({"device": "tpu"}, "latency device must be 'cpu', 'cuda' or 'cuda:N'"),
                            ({"threads": 0}, "latency threads must be an integer >= 1"),
                            ({"min_speedup": 0}, r"latency min_speedup must be a number in \(0, 100\)")):
        with pytest.raises(ValueError, match=pattern):
            LatencyPolicy(**kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LatencyPolicy(device="cuda")
    with pytest.raises(FactorizeError, match="latency must be a core.latency.LatencyPolicy"):
        factorize_model(BigAndTiny(), rank=2, latency={"batch": 1})


def test_compare_latency_lists_kept_layers_with_both_times():
    res = compare_latency("resnet18", rank_ratio=0.25, image_size=16, batches=[1], threads=1, repeats=3,
                          latency_aware=True, per_layer=False)
    assert res["small_input"] is True and res["latency_policy"]["batch"] == 1
    variants = [e["variant"] for e in res["latency"]["end_to_end"]]
    assert variants == ["dense", "factored", "latency-aware"]
    aware = res["factorize"]["latency-aware"]
    assert aware["layers_kept_dense"] == len(res["kept_dense"])
    assert aware["layers_factored"] + aware["layers_kept_dense"] == res["factorize"]["factored"]["layers_factored"]
    for k in res["kept_dense"]:
        assert k["factored_ms"] >= k["dense_ms"] and "not faster" in k["reason"]
    assert res["latency"]["layers"] == {}


def test_compare_latency_with_per_layer_ranks_factors_exactly_those_layers():
    """ranks (a compress job's per-layer ranks): those layers at those ranks, every other one dense; a full-rank
    1x1 conv (two convolutions where there was one, 1.5x the multiply-adds) is measured slower."""
    ranks = {"layer2.0.downsample.0": 64, "layer3.0.conv2": 32}
    res = compare_latency("resnet18", ranks=ranks, image_size=16, batches=[1], threads=1, repeats=5)
    assert res["ranks"] == ranks and res["rank"] is None and res["rank_ratio"] is None
    rows = {r["layer"]: r for r in res["latency"]["layers"]["1"]}
    assert {k: r["rank"] for k, r in rows.items()} == ranks
    assert rows["layer2.0.downsample.0"]["slower"] and not rows["layer3.0.conv2"]["slower"]
    for r in rows.values():
        assert r["speedup"] == pytest.approx(r["dense"]["p50_ms"] / r["factored"]["p50_ms"])
    dense = build_model("resnet18", num_classes=10, small_input=True)
    fact = res["factorize"]["factored"]
    assert fact["layers_factored"] == 2 and fact["params_dense"] == sum(p.numel() for p in dense.parameters())
    assert fact["params_dense"] - fact["params_factored"] == (256 * 2304 - 32 * (256 + 2304)) + (128 * 64 - 64 * (128 + 64))
    for bad, msg in (({"layer9.conv": 3}, "'layer9.conv' is not a Conv2d/Linear layer"),
                     ({"layer1.0.conv1": 65}, r"layer1.0.conv1 needs a rank in 1..64, got 65"),
                     ({"layer1.0.bn1": 2}, "is not a Conv2d/Linear")):
        with pytest.raises(ValueError, match=msg):
            factorize_with_ranks(build_model("resnet18", num_classes=10, small_input=True), bad)
    with pytest.raises(ValueError, match="exactly one of rank, rank_ratio or ranks"):
        compare_latency("resnet18", rank=4, ranks=ranks, image_size=16, batches=[1])


def test_compare_latency_ranks_latency_aware_keeps_the_slower_layer_dense():
    ranks = {"layer2.0.downsample.0": 64, "layer3.0.conv2": 32}
    res = compare_latency("resnet18", ranks=ranks, image_size=16, batches=[1], threads=1, repeats=5,
                          latency_aware=True, per_layer=False)
    assert [k["layer"] for k in res["kept_dense"]] == ["layer2.0.downsample.0"]
    assert res["factorize"]["latency-aware"]["layers_factored"] == 1 and res["latency_policy"]["batch"] == 1


def test_compare_latency_reports_progress_and_stops_when_told():
    class Stop(LatencyCallbacks):
        def __init__(self, after: int) -> None:
            self.seen: list[float] = []
            self.after = after

        def on_progress(self, frac: float) -> None:
            self.seen.append(frac)

        def should_stop(self) -> bool:
            return len(self.seen) >= self.after

    go = Stop(10**9)
    compare_latency("resnet18", ranks={"layer3.0.conv2": 32, "layer4.0.conv2": 64}, image_size=16, batches=[1, 2],
                    threads=1, repeats=3, callbacks=go)
    assert go.seen == sorted(go.seen) and go.seen[-1] == pytest.approx(1.0) and len(go.seen) == 2 + 2 * 2
    stop = Stop(3)
    with pytest.raises(LatencyCancelled):
        compare_latency("resnet18", ranks={"layer3.0.conv2": 32, "layer4.0.conv2": 64}, image_size=16, batches=[1, 2],
                        threads=1, repeats=3, callbacks=stop)
    assert len(stop.seen) == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LOWRANK, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("args, fragment", [
    (["--batch", "0"], "--batch must be a comma-separated list of integers >= 1"),
    (["--batch", "1,x"], "--batch must be a comma-separated list of integers"),
    (["--image-size", "4"], "--image-size must be an integer >= 8, got 4"),
    (["--threads", "0"], "--threads must be an integer >= 1"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--repeats", "1"], "--repeats must be an integer >= 3"),
    (["--rank-ratio", "1.5"], "--rank-ratio must be in (0, 1]"),
])
def test_latency_cli_bad_flags_exit_2_with_one_line(args, fragment):
    base = ["latency", "--model", "resnet18", "--rank-ratio", "0.25"]
    if "--rank-ratio" in args:
        base = base[:3]
    proc = _cli(*base, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_latency_cli_unknown_model_and_factorize_latency_flags():
    proc = _cli("latency", "--model", "vgg", "--rank", "4")
    assert proc.returncode == 2 and "--model must be one of resnet18" in proc.stderr.strip()
    proc = _cli("factorize", "--model", "resnet18", "--rank-ratio", "0.25", "--latency-aware", "--batch", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --batch must be an integer >= 1, got 0"


def test_latency_cli_json():
    proc = _cli("latency", "--model", "resnet18", "--rank-ratio", "0.5", "--image-size", "16", "--batch", "1,2",
                "--repeats", "3", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    lat = res["latency"]
    assert lat["threads"] == 1 and lat["batches"] == [1, 2] and lat["image_size"] == 16
    assert len(lat["end_to_end"]) == 4 and set(lat["layers"]) == {"1", "2"}
    n = res["factorize"]["factored"]["layers_factored"]
    assert all(len(rows) == n for rows in lat["layers"].values())
    assert all(r["slower"] == (r["speedup"] < 1) for r in lat["layers"]["1"])


# ----------------------------------------------------------------------------- train and compress

def _train_cfg(**kw) -> dict:
    """ResNet-18 (small-image stem) on 32 synthetic 16 px images: layer4.0.conv2 at ratio 0.1 has 9x fewer
    multiply-adds factored (faster); the classifier 512 -> 10 at rank 1 is two tiny calls where there was
    one (slower at batch 1, like the 4 x 4 linear above)."""
    return {**dict(model="resnet18", dataset="synthetic", synthetic_train_size=32, synthetic_val_size=16,
                   image_size=16, rank_ratio=0.1, init="spectral", include=["layer4.0.conv2", "fc"], epochs=2,
                   batch_size=16, device="cpu", seed=0, latency_aware=True, latency_batch=1), **kw}


def test_train_latency_aware_keeps_the_slower_layer_dense_and_a_resume_reuses_the_verdicts(tmp_path, monkeypatch):
    import core.latency
    from core.run_context import TrainCallbacks
    from core.train import TrainingCancelled, train

    class StopAfterOne(TrainCallbacks):
        def __init__(self) -> None:
            self.epochs = 0

        def on_metrics(self, step, epoch, metrics):
            self.epochs += "val_top1" in metrics

        def should_stop(self) -> bool:
            return self.epochs >= 1

    timed: list[tuple] = []  # a spy: every layer pair the policy times, passed through
    real = core.latency.time_layers
    monkeypatch.setattr(core.latency, "time_layers", lambda d, f, shape, **kw: timed.append(shape) or real(d, f, shape, **kw))
    with pytest.raises(TrainingCancelled):
        train(_train_cfg(), checkpoint_dir=tmp_path, callbacks=StopAfterOne())
    assert sorted(timed) == [(1, 512), (1, 512, 2, 2)]  # fc, layer4.0.conv2: measured once each
    first = torch.load(tmp_path / "last.pt", weights_only=True)["init_report"]
    rows = {r["layer"]: r for r in first["layers"]}
    conv, fc = rows["layer4.0.conv2"], rows["fc"]
    assert conv["status"] == "factored" and conv["dense_ms"] > conv["factored_ms"], conv
    assert fc["status"] == "kept_dense" and fc["factored_ms"] >= fc["dense_ms"], fc
    assert fc["reason"].startswith("factored not faster on cpu:") and "batch 1" in fc["reason"]
    assert first["latency"]["batch"] == 1 and first["latency"]["device"] == "cpu"
    assert first["totals"]["layers_factored"] == 1 and first["totals"]["layers_kept_dense"] == 1

    timed.clear()
    summary = train(_train_cfg(), checkpoint_dir=tmp_path, resume=True)
    assert timed == []  # the resumed run did not measure again
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == 2
    again = {r["layer"]: r for r in summary["init_report"]}
    # The same verdicts, times included: measured once, read back from the checkpoint (a re-measurement
    # gives other times, and might flip a decision and so the structure the checkpoint's weights fit).
    for name in ("layer4.0.conv2", "fc"):
        assert (again[name]["status"], again[name]["dense_ms"], again[name]["factored_ms"]) == \
               (rows[name]["status"], rows[name]["dense_ms"], rows[name]["factored_ms"])
    assert summary["latency_policy"]["batch"] == 1 and summary["init_totals"]["layers_kept_dense"] == 1
    assert summary["params_factored"] < summary["params_dense"]


def test_train_latency_aware_that_keeps_every_layer_dense_fails_naming_the_field():
    from core.train import train
    from core.train_fields import FieldError

    with pytest.raises(FieldError, match="latency_aware kept every layer of resnet18 dense") as err:
        train(_train_cfg(include=["fc"], epochs=1))
    assert err.value.field == "latency_aware"
    with pytest.raises(FieldError, match="latency_aware chooses which layers to factor") as err:
        train(dict(_train_cfg(), rank_ratio=None, include=None, init="dense"))
    assert err.value.field == "latency_aware"


class WideAndNarrow(nn.Module):
    """stem conv 3 -> 4 on 16 px (1024 features), `wide` 1024 x 1024 (rank 3: ~170x fewer multiply-adds,
    faster), `mid` 1024 -> 16, `narrow` 16 x 16 (rank 3: two tiny calls where there was one, slower), classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.wide, self.mid, self.narrow, self.fc = nn.Linear(1024, 1024), nn.Linear(1024, 16), nn.Linear(16, 16), \
            nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x)).flatten(1)
        return self.fc(torch.relu(self.narrow(torch.relu(self.mid(torch.relu(self.wide(x)))))))


def test_compress_latency_aware_keeps_the_slower_layer_dense():
    from torch.utils.data import DataLoader, TensorDataset

    from core.compress import CompressOptions, compress_model

    torch.manual_seed(0)
    net = WideAndNarrow().eval()
    images = torch.randn(48, 3, 16, 16)
    fit = DataLoader(TensorDataset(images[:32], torch.zeros(32, dtype=torch.long)), batch_size=16)
    held = DataLoader(TensorDataset(images[32:], torch.zeros(16, dtype=torch.long)), batch_size=16)
    opts = dict(method="spectral", rank=3, include=["wide", "narrow"], bn_reestimate=False)
    stages: list[str] = []

    class Stages:
        on_progress = on_layer = on_metrics = on_epoch = staticmethod(lambda *a: None)
        should_stop = staticmethod(lambda: False)

        @staticmethod
        def on_stage(stage):
            stages.append(stage)

    result = compress_model(net, fit, held, CompressOptions(**opts, latency_aware=True), callbacks=Stages())
    rows = {r["layer"]: r for r in result.report["layers"]}
    wide, narrow = rows["wide"], rows["narrow"]
    assert wide["status"] == "factored" and wide["dense_ms"] > wide["factored_ms"], wide
    assert narrow["status"] == "kept_dense" and narrow["factored_ms"] >= narrow["dense_ms"], narrow
    assert narrow["reason"].startswith("factored not faster on cpu:") and narrow["rank"] is None
    assert type(result.model.narrow) is nn.Linear and torch.equal(result.model.narrow.weight, net.narrow.weight)
    assert isinstance(result.model.wide, FactoredLinear) and result.model.wide.rank == 3
    totals = result.report["totals"]
    assert totals["layers_factored"] == 1 and totals["layers_kept_dense"] == 1
    assert result.report["latency"]["batch"] == 1 and result.report["latency"]["image_size"] == 16
    assert stages[:4] == ["select", "allocate", "latency", "factor"]
    # Without the option both are factored, and no layer is timed.
    plain = compress_model(net, fit, held, CompressOptions(**opts))
    assert [r["status"] for r in plain.report["layers"] if r["layer"] in ("wide", "narrow")] == ["factored", "factored"]
    assert plain.report["latency"] is None and "dense_ms" not in {k for r in plain.report["layers"] for k in r}

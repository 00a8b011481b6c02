"""compress_model end to end on a small BN network, the run from a config, and `lowrank compress`."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.calibration import CalibrationCancelled
from core.compress import CompressCallbacks, CompressOptions, compress_model
from core.layer_compress import METHODS
from core.layers import FactoredConv2d, FactoredLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SmallNet(nn.Module):
    """stem conv-BN-relu, conv-BN-relu, depthwise conv, 1x1 conv-BN (affine block), linear-relu, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.c2, self.b2 = nn.Conv2d(32, 48, 1), nn.BatchNorm2d(48)
        self.fc1, self.fc = nn.Linear(48, 40), nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b0(self.stem(x)))
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b2(self.c2(self.dw(x)))
        return self.fc(torch.relu(self.fc1(x.mean((2, 3)))))


@pytest.fixture(scope="module")
def trained():
    """SmallNet with BN statistics and affine parameters away from the init, plus calibration loaders."""
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(32, 3, 16, 16))
        for bn in (net.b0, net.b1, net.b2):
            bn.weight.uniform_(0.2, 2.0)
            bn.bias.normal_()
    net.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(160, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (160,), generator=g)
    fit = DataLoader(TensorDataset(images[:128], labels[:128]), batch_size=32)
    held = DataLoader(TensorDataset(images[128:], labels[128:]), batch_size=32)
    return net, fit, held


def _run(trained, **kw):
    net, fit, held = trained
    return compress_model(net, fit, held, CompressOptions(**kw), input_size=(3, 16, 16))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_compresses_to_the_budget(trained, method):
    net = trained[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = _run(trained, method=method, budget=0.3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the source is untouched
    rows = {r["layer"]: r for r in result.report["layers"]}
    assert rows["stem"]["reason"] == "stem conv" and rows["fc"]["reason"] == "classifier"
    assert rows["dw"]["status"] == "skipped" and "grouped conv" in rows["dw"]["reason"]
    for name in ("c1", "c2", "fc1"):
        row = rows[name]
        assert row["status"] == "factored" and row["rank"] >= 1
        errs = row["errors"]
        assert 0 <= errs["block"] < 1.5 and 0 <= errs["linear"] < 1.5 and errs["surrogate"] is not None
    # measured on the 32 held-out images only: c1 has 8 x 8 output positions (all 64 sampled), fc1 one
    assert rows["c1"]["heldout_patches"] == 32 * 64 and rows["fc1"]["heldout_patches"] == 32
    assert (rows["c1"]["bn"], rows["c1"]["activation"]) == ("b1", "relu")
    assert (rows["c2"]["bn"], rows["c2"]["activation"]) == ("b2", "none")
    assert rows["c2"]["errors"]["surrogate_kind"] == "linear"
    assert isinstance(result.model.c1, FactoredConv2d) and isinstance(result.model.fc1, FactoredLinear)
    totals = result.report["totals"]
    assert totals["budget_used"] <= 0.3 and totals["params_compressed"] < totals["params_dense"]
    assert totals["macs_compressed"] < totals["macs_dense"]
    json.dumps(result.report)  # the contract: JSON-able


def test_calibration_aware_methods_beat_data_free_ones_on_held_out_errors(trained):
    """On held-out patches whiten has the lowest linear error of all methods at the same ranks (it is
    the optimum on the fit data, and the held-out data come from the same distribution)."""
    linear = {}
    for method in METHODS:
        rows = _run(trained, method=method, rank_ratio=0.2).report["layers"]
        linear[method] = sum(r["errors"]["linear"] for r in rows if r.get("errors"))
    assert linear["whiten"] == min(linear.values())
    assert linear["whiten"] < 0.7 * linear["spectral"]


def test_refine_lowers_the_block_errors(trained):
    off = _run(trained, method="spectral", budget=0.3)
    for mode in ("independent", "sequential"):
        on = _run(trained, method="spectral", budget=0.3, refine=mode, refine_steps=60)
        assert on.report["totals"]["mean_block_error"] < 0.8 * off.report["totals"]["mean_block_error"], mode
        rows = [r for r in on.report["layers"] if r["status"] == "factored"]
        assert all(r["refine"]["mode"] == mode and r["refine"]["steps"] == 60 for r in rows)


def test_sequential_refine_sees_the_compressed_networks_inputs(trained):
    """c1 is the first factored layer (its inputs are the same either way); c2's inputs in sequential
    mode come through the compressed c1, so its starting loss against the dense targets is larger."""
    rows = {}
    for mode in ("independent", "sequential"):
        report = _run(trained, method="spectral", budget=0.3, refine=mode, refine_steps=1).report
        rows[mode] = {r["layer"]: r["refine"] for r in report["layers"] if r["status"] == "factored"}
    assert rows["sequential"]["c1"]["loss_before"] == pytest.approx(rows["independent"]["c1"]["loss_before"], rel=1e-6)
    assert rows["sequential"]["c2"]["loss_before"] > 1.05 * rows["independent"]["c2"]["loss_before"]


def test_greedy_allocation_end_to_end(trained):
    result = _run(trained, method="whiten", budget=0.35, allocation="greedy")
    totals = result.report["totals"]
    assert totals["budget_used"] <= 0.35
    assert result.report["calibration"]["allocate"]["passes"] == 1


def test_bn_reestimation_changes_only_the_compressed_model(trained):
    net = trained[0]
    mean = net.b1.running_mean.clone()
    result = _run(trained, method="spectral", budget=0.3)
    assert torch.equal(net.b1.running_mean, mean)
    assert not torch.allclose(result.model.b1.running_mean, mean)
    assert result.report["calibration"]["bn_reestimate_images"] == 128
    kept = _run(trained, method="spectral", budget=0.3, bn_reestimate=False)
    assert torch.equal(kept.model.b1.running_mean, mean)


def test_callbacks_stream_stages_layers_and_progress_and_can_cancel(trained):
    class Recorder(CompressCallbacks):
        def __init__(self) -> None:
            self.stages, self.fracs, self.rows = [], [], []

        def on_stage(self, stage):
            self.stages.append(stage)

        def on_progress(self, frac):
            self.fracs.append(frac)

        def on_layer(self, row):
            self.rows.append(row["layer"])

    rec = Recorder()
    net, fit, held = trained
    compress_model(net, fit, held, CompressOptions(method="whiten", budget=0.3, refine="independent", refine_steps=5),
                   callbacks=rec)
    assert rec.stages == ["select", "allocate", "factor", "refine", "evaluate", "bn"]
    assert rec.fracs == sorted(rec.fracs) and rec.fracs[-1] == 1.0
    assert rec.rows == ["c1", "c2", "fc1"]

    class Stop(CompressCallbacks):
        def should_stop(self):
            return True

    with pytest.raises(CalibrationCancelled):
        compress_model(net, fit, held, CompressOptions(method="whiten", budget=0.3), callbacks=Stop())


def test_options_are_validated_with_the_field_named(trained):
    net, fit, held = trained
    for kw, match in [(dict(method="svd", budget=0.3), "method must be one of"),
                      (dict(method="whiten"), "give exactly one of budget, rank, rank_ratio"),
                      (dict(budget=0.3, rank=4), "give exactly one of budget, rank, rank_ratio \\(got budget, rank\\)"),
                      (dict(budget=1.3), "budget must be in \\(0, 1\\]"),
                      (dict(budget=0.3, refine="both"), "refine must be one of off, independent, sequential"),
                      (dict(budget=0.3, eps=0.0), "eps must be > 0"),
                      (dict(budget=0.3, include=["nope"]), "include: no Conv2d/Linear layer named 'nope'")]:
        with pytest.raises(ValueError, match=match):
            compress_model(net, fit, held, CompressOptions(**kw))
    with pytest.raises(ValueError, match="unknown compress option\\(s\\): ranks"):
        CompressOptions.from_dict({"ranks": 3})


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    torch.manual_seed(3)
    from core.models import build_model

    path = tmp_path_factory.mktemp("src") / "r18.pt"
    torch.save(build_model("resnet18", num_classes=10).state_dict(), path)
    return path


def test_lowrank_compress_cli(r18_file, tmp_path, capsys):
    from lowrank.cli import main

    out = tmp_path / "c.safetensors"
    args = [str(r18_file), "--model", "resnet18", "--dataset", "digits", "--method", "whiten", "--budget", "0.3",
            "--include", "layer1.0.conv1,layer1.0.conv2", "--calib-images", "32", "--heldout-images", "16",
            "--calib-batch-size", "16", "--max-val-batches", "1", "--device", "cpu", "--save", str(out)]
    assert main(["compress", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["top1"]) == {"dense", "compressed_before_bn", "compressed", "finetuned"}
    assert report["top1"]["finetuned"] == [] and report["finetune"] is None
    assert report["data"] == {"dataset": "digits", "image_size": 32, "num_classes": 10, "calib_images": 32,
                              "heldout_images": 16, "val_images": 360}
    factored = [r["layer"] for r in report["layers"] if r["status"] == "factored"]
    assert factored == ["layer1.0.conv1", "layer1.0.conv2"]
    from core.artifact import load_compressed

    model, spec = load_compressed(out)
    assert [e["layer"] for e in spec["factored"]] == factored and spec["extra"]["method"] == "whiten"
    assert main(["compress", *args]) == 0
    text = capsys.readouterr().out
    assert "top-1 (validation, before fine-tuning): dense" in text and "layer1.0.conv1" in text


def test_a_compressed_file_remembers_its_image_size_for_the_next_compression(r18_file, tmp_path, capsys):
    """Compressing a compressed model again (more layers) calibrates at the size the first run used, not
    the data set's default (32 px for digits)."""
    from core.artifact import load_compressed
    from lowrank.cli import main

    small = ["--dataset", "digits", "--method", "whiten", "--budget", "0.3", "--calib-images", "16",
             "--heldout-images", "16", "--calib-batch-size", "16", "--max-val-batches", "1", "--device", "cpu"]
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    assert main(["compress", str(r18_file), "--model", "resnet18", *small, "--image-size", "16",
                 "--include", "layer1.0.conv1", "--save", str(first), "--json"]) == 0
    capsys.readouterr()
    assert load_compressed(first)[1]["extra"]["data"] == {"dataset": "digits", "image_size": 16}
    assert main(["compress", str(first), *small, "--include", "layer1.0.conv2", "--save", str(second), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["image_size"] == 16, report["data"]
    assert report["source"]["kind"] == "compressed"
    assert load_compressed(second)[1]["extra"]["data"] == {"dataset": "digits", "image_size": 16}
    # Another data set: its own default size, not the file's.
    assert main(["compress", str(first), *small[:1], "synthetic", *small[2:], "--include", "layer1.0.conv2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["image_size"] != 16


@pytest.mark.parametrize("argv,match", [
    (["--model", "resnet18", "--method", "whiten"], "give one of --budget, --rank, --rank-ratio"),
    (["--model", "resnet18", "--budget", "0.3", "--method", "svd"], "method must be one of"),
    (["--model", "resnet18", "--budget", "x"], "--budget must be a number, got 'x'"),
    (["--model", "resnet50", "--budget", "0.3"], "do not fit resnet50"),
    (["--budget", "0.3"], "model: a plain state_dict does not say its architecture"),
    (["--model", "resnet18", "--budget", "0.3", "--calib-images", "2000"], "exceeds the 1437 training images"),
])
def test_cli_mistakes_exit_2_with_one_line(r18_file, capsys, argv, match):
    import re

    from lowrank.cli import main

    assert main(["compress", str(r18_file), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err

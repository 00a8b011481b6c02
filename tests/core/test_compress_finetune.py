"""Fine-tuning a compressed model (core.compress_run, `finetune_epochs`): core.train's loop started from the
compressed network, the data set's recipe with the `finetune` overrides, per-epoch callbacks, cancel, the
artifact, the field errors, and `lowrank compress --finetune-epochs`.

One dense ResNet-18 trained on digits with the shipped recipe (2 epochs, ~40 s on one core) is the source of
every run here; budget 0.1 with spectral factors damages it badly, which fine-tuning must repair."""
from __future__ import annotations

import json
import re

import pytest
import torch

from core.calibration import CalibrationCancelled
from core.compress import CompressCallbacks
from core.compress_run import FinetuneCancelled, run_compress
from core.layers import factored_modules
from core.train import TrainingCancelled

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    from core.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dense")
    summary = train(dict(model="resnet18", dataset="digits", init="dense", epochs=2, device="cpu"), checkpoint_dir=out)
    assert summary["val_top1"] > 0.8, summary["val_top1"]  # a trained source, or the tests below prove nothing
    return out / "last.pt"


# A small but real compression: ResNet-18's layer1-3 (13 convs; layer4's 4608 x 4608 second moments would
# triple the time), few calibration images.
BASE = dict(dataset="digits", method="spectral", budget=0.1, include=["layer1", "layer2", "layer3"], calib_images=128,
            heldout_images=32, device="cpu")
# Where only the fine-tuning is under test: layer1 alone (no 4608 x 4608 second moments to decompose).
LIGHT = dict(BASE, budget=0.5, include=["layer1"], calib_images=64, heldout_images=16)


class Recorder(CompressCallbacks):
    def __init__(self, stop_after_polls: int | None = None) -> None:
        self.stages, self.epochs, self.fracs, self.metrics = [], [], [], {}
        self.stop_after, self.polls = stop_after_polls, 0

    def on_stage(self, stage):
        self.stages.append(stage)

    def on_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))

    def on_progress(self, frac):
        self.fracs.append(frac)

    def on_metrics(self, metrics):
        self.metrics.update(metrics)

    def should_stop(self):
        if self.stop_after is None or self.stages[-1:] != ["finetune"]:
            return False
        self.polls += 1
        return self.polls > self.stop_after


@pytest.fixture(scope="module")
def runs(dense_ckpt, tmp_path_factory):
    """The same compression without and with one epoch of fine-tuning (saved)."""
    torch.set_num_threads(1)
    save = tmp_path_factory.mktemp("out") / "ft.safetensors"
    plain = run_compress(dict(BASE, source=str(dense_ckpt)))
    rec = Recorder()
    tuned = run_compress(dict(BASE, source=str(dense_ckpt), finetune_epochs=1), callbacks=rec, save_path=str(save))
    return plain, tuned, rec, save


def test_finetuning_repairs_a_damaged_compression(runs):
    plain, tuned, _, _ = runs
    top1 = tuned.report["top1"]
    # the same compression before fine-tuning (deterministic on CPU), and it is badly damaged
    assert top1["compressed"] == plain.report["top1"]["compressed"]
    assert top1["compressed"] < top1["dense"] - 0.3, top1
    assert len(top1["finetuned"]) == 1 and top1["finetuned"][0] > top1["compressed"] + 0.3, top1
    assert plain.report["top1"]["finetuned"] == [] and plain.report["finetune"] is None
    ft = tuned.report["finetune"]  # the digits recipe's values, as `lowrank train` resolves them
    assert (ft["recipe"], ft["epochs"], ft["lr"], ft["batch_size"], ft["momentum"], ft["nesterov"], ft["schedule"]) \
        == ("digits", 1, 0.02, 64, 0.9, True, "cosine")
    assert [h["epoch"] for h in ft["history"]] == [1] and ft["history"][0]["val_top1"] == top1["finetuned"][0]
    json.dumps(tuned.report)


def test_finetuning_trains_every_factor(runs):
    plain, tuned, _, _ = runs
    before, after = dict(factored_modules(plain.model)), dict(factored_modules(tuned.model))
    assert len(after) == tuned.report["totals"]["layers_factored"] > 10 and after.keys() == before.keys()
    for name, layer in after.items():
        for half in ("u", "v"):
            w0, w1 = getattr(before[name], half).weight, getattr(layer, half).weight
            assert (w1 - w0).abs().max() > 1e-4 * w0.abs().max(), (name, half)
    # and the rest of the network (the dense stem, BN affine parameters, the classifier)
    assert not torch.equal(plain.model.conv1.weight, tuned.model.conv1.weight)
    assert not torch.equal(plain.model.fc.weight, tuned.model.fc.weight)
    assert not torch.equal(plain.model.bn1.weight, tuned.model.bn1.weight)


def test_callbacks_see_stages_epochs_and_progress(runs):
    _, tuned, rec, _ = runs
    assert rec.stages == ["select", "allocate", "factor", "evaluate", "finetune"]
    assert [e for e, _ in rec.epochs] == [1]
    metrics = rec.epochs[0][1]
    assert {"train_loss", "val_loss", "val_top1", "lr"} <= set(metrics)
    assert metrics["val_top1"] == tuned.report["top1"]["finetuned"][0]
    assert rec.metrics["top1_finetuned"] == metrics["val_top1"]
    assert rec.fracs == sorted(rec.fracs) and rec.fracs[-1] == 1.0
    assert any(0.5 < f < 1.0 for f in rec.fracs)  # fine-tuning's steps report progress too (second half)


def test_the_artifact_holds_the_finetuned_model(runs):
    from core.artifact import load_compressed
    from core.calibration import evaluate_top1
    from core.data import build_datasets

    _, tuned, _, save = runs
    model, spec = load_compressed(save)
    x = torch.stack([build_datasets("digits", image_size=8)[1][i][0] for i in range(32)])
    with torch.no_grad():
        assert torch.equal(model(x), tuned.model.eval()(x))
    assert spec["extra"]["finetune"]["epochs"] == 1 and spec["extra"]["top1"]["finetuned"] == \
        tuned.report["top1"]["finetuned"]
    _, val, _ = build_datasets("digits", image_size=8)
    from torch.utils.data import DataLoader

    assert evaluate_top1(model, DataLoader(val, batch_size=100), "cpu")["top1"] == tuned.report["top1"]["finetuned"][0]


def test_overrides_win_over_the_recipe_and_epochs_are_reported_each(dense_ckpt):
    rec = Recorder()
    result = run_compress(dict(LIGHT, source=str(dense_ckpt), finetune_epochs=2,
                               finetune={"lr": 0.005, "batch_size": 32, "max_train_batches": 3, "nesterov": False}),
                          callbacks=rec)
    ft = result.report["finetune"]
    assert (ft["lr"], ft["batch_size"], ft["max_train_batches"], ft["nesterov"]) == (0.005, 32, 3, False)
    assert (ft["momentum"], ft["weight_decay"], ft["recipe"]) == (0.9, 5e-4, "digits")  # the rest: the recipe's
    assert [e for e, _ in rec.epochs] == [1, 2]
    assert result.report["top1"]["finetuned"] == [m["val_top1"] for _, m in rec.epochs]
    # the cosine schedule over 2 epochs of 3 steps (warm-up 0.5 epoch = 2 steps): lr after step 3, then 0
    assert rec.epochs[0][1]["lr"] == pytest.approx(0.005 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))
    assert rec.epochs[1][1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_should_stop_cancels_within_the_first_epoch(dense_ckpt):
    rec = Recorder(stop_after_polls=2)
    with pytest.raises(FinetuneCancelled, match="cancelled at epoch 1, step 2") as info:
        run_compress(dict(LIGHT, source=str(dense_ckpt), finetune_epochs=1), callbacks=rec)
    assert isinstance(info.value, CalibrationCancelled) and isinstance(info.value, TrainingCancelled)
    assert rec.epochs == [] and rec.polls == 3


@pytest.mark.parametrize("kw,match", [
    (dict(finetune={"lr": -1.0}), r"^finetune\.lr must be > 0, got -1\.0$"),
    (dict(finetune={"momentum": 1.5}), r"^finetune\.momentum must be in \[0, 1\), got 1\.5$"),
    (dict(finetune={"optimizer": "adam"}), r"^finetune\.optimizer must be one of sgd, adamw, got 'adam'$"),
    (dict(finetune={"lrr": 0.1}), r"^finetune\.lrr is not a training field \(did you mean lr\?\); allowed: recipe, "),
    (dict(finetune={"epochs": 3}), r"^finetune\.epochs is not an override: fine-tuning lasts finetune_epochs"),
    (dict(finetune={"dataset": "cifar10"}), r"^finetune\.dataset is set by the compress run itself"),
    (dict(finetune=[0.1]), r"^finetune must be a mapping of training fields"),
    (dict(finetune_epochs=-1), r"^finetune_epochs must be >= 0, got -1$"),  # core.compress_fields' table
    (dict(finetune_epochs=1.5), r"^finetune_epochs must be an integer, got 1\.5$"),
])
def test_bad_finetune_fields_are_named_before_anything_runs(kw, match):
    with pytest.raises(ValueError, match=match):
        run_compress(dict(BASE, source="/nonexistent/last.pt", **kw))


@pytest.mark.parametrize("finetune,match", [
    ({"warmup_epochs": 3.0}, r"^finetune\.warmup_epochs must be <= finetune_epochs \(1\), got 3\.0$"),
    ({"batch_size": 5000}, r"^finetune\.batch_size: 5000 x 1 process\(es\) exceeds the 1437 training images"),
    ({"recipe": "cifar", "lr": None}, None),  # resolves (the cifar recipe's lr); checked below
])
def test_rules_across_fields_are_checked_before_compressing(dense_ckpt, finetune, match):
    from core.compress_run import CompressConfig, finetune_config

    config = CompressConfig.from_dict(dict(BASE, source=str(dense_ckpt), finetune_epochs=1, finetune=finetune))
    if match is None:
        tc = finetune_config(config, "resnet18", True, 8)
        assert (tc.recipe, tc.lr, tc.batch_size, tc.epochs, tc.image_size) == ("cifar", 0.1, 128, 1, 8)
        return
    rec = Recorder()
    with pytest.raises(ValueError, match=match):
        run_compress(config, callbacks=rec)
    assert rec.stages == []  # found before the (minutes-long on big models) compression


def test_train_init_model_trains_the_given_network_only_as_it_is():
    from core.models import build_model
    from core.train import train
    from core.train_fields import FieldError

    base = dict(model="resnet18", dataset="synthetic", image_size=16, synthetic_train_size=16, synthetic_val_size=8,
                batch_size=8, epochs=1, max_train_batches=1, device="cpu", lr=0.01)
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10, small_input=True)
    w0 = net.fc.weight.detach().clone()
    summary = train(dict(base, init="dense"), init_model=net)
    assert summary["params_dense"] == sum(p.numel() for p in net.parameters())
    assert not torch.equal(net.fc.weight, w0)  # trained in place
    with pytest.raises(FieldError, match="init_model is trained as it is: leave rank and rank_ratio out"):
        train(dict(base, init="spectral", rank_ratio=0.5), init_model=net)


def test_lowrank_compress_finetune_cli(dense_ckpt, tmp_path, capsys):
    from lowrank.cli import main

    args = ["compress", str(dense_ckpt), "--dataset", "digits", "--method", "spectral", "--budget", "0.5",
            "--include", "layer1", "--calib-images", "64", "--heldout-images", "16", "--device", "cpu",
            "--finetune-epochs", "1",
            "--lr", "0.01", "--batch-size", "32", "--max-train-batches", "2", "--no-nesterov"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^fine-tune epoch 1/1  train_loss [\d.]+  val_loss [\d.]+  val_top1 [\d.]+  lr ", err, re.M), err
    line = re.search(r"top-1 after fine-tuning \(1 epoch\(s\), recipe digits, lr 0\.01, batch 32\): epoch 1 ([\d.]+)",
                     out)
    assert line, out
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["finetune"]["nesterov"] is False
    # The text shows 4 decimals; the JSON holds the full value (e.g. 65/72 = 0.90277...).
    [finetuned] = report["top1"]["finetuned"]
    assert round(finetuned, 4) == float(line[1]), (finetuned, line[1])


@pytest.mark.parametrize("argv,match", [
    (["--lr", "-1"], r"^error: --lr must be > 0, got -1\.0$"),
    (["--lr", "x"], r"^error: --lr must be a number, got 'x'$"),
    (["--optimizer", "adam"], r"^error: --optimizer must be one of sgd, adamw, got 'adam'$"),
    (["--batch-size", "5000"], r"^error: --batch-size: 5000 x 1 process\(es\) exceeds the 1437 training images"),
])
def test_cli_finetune_mistakes_name_the_flag(dense_ckpt, capsys, argv, match):
    from lowrank.cli import main

    assert main(["compress", str(dense_ckpt), "--budget", "0.5", "--device", "cpu", "--finetune-epochs", "1",
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err

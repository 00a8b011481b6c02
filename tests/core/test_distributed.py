"""DDP on CPU: 2 processes under torchrun with the gloo backend, on tiny synthetic data."""
from __future__ import annotations

import pytest
import torch

from core.train import TrainCallbacks, TrainingCancelled, TrainingDiverged, train


def ddp_config(**overrides) -> dict:
    # ResNet-18 at ratio 0.25, 16 px synthetic images: 2 processes x 4 steps of 8 images per epoch
    cfg = dict(model="resnet18", dataset="synthetic", image_size=16, synthetic_train_size=64,
               synthetic_val_size=20, rank_ratio=0.25, init="spectral", include=["layer3", "layer4"],
               epochs=2, batch_size=8, lr=0.05, device="cpu", devices=2, seed=1, log_every=2)
    cfg.update(overrides)
    return cfg


class Recorder(TrainCallbacks):
    def __init__(self) -> None:
        self.epochs, self.steps, self.progress = [], [], []

    def on_metrics(self, step, epoch, metrics):
        (self.epochs if "val_top1" in metrics else self.steps).append((step, epoch, metrics))

    def on_progress(self, frac):
        self.progress.append(frac)


def test_two_gloo_processes_train_in_sync(tmp_path):
    rec = Recorder()
    summary = train(ddp_config(), checkpoint_dir=tmp_path, callbacks=rec)
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    # every rank ends with bit-identical parameters and buffers
    fingerprints = summary["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1] and summary["ranks_in_sync"]
    # rank 0's reports reach the caller: 64 images / (2 x 8) = 4 steps per epoch
    assert [(s, e) for s, e, _ in rec.epochs] == [(4, 1), (8, 2)]
    assert [(s, e) for s, e, _ in rec.steps] == [(2, 1), (4, 1), (6, 2), (8, 2)]
    assert rec.progress[-1] == 1.0
    # validation covers all 20 images once across the two processes (10 + 10, no padding)
    top1 = rec.epochs[-1][2]["val_top1"]
    assert abs(top1 * 20 - round(top1 * 20)) < 1e-9
    # rank 0 wrote the checkpoint; its weights are the ones every rank holds
    from core.factorize import factorize_model
    from core.models import build_model
    from core.train import weights_fingerprint

    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    model = build_model("resnet18", num_classes=10, small_input=ckpt["config"]["small_input"])  # auto: 16 px
    factorize_model(model, rank_ratio=0.25, method="spectral", include=["layer3", "layer4"], compute_init=False)
    model.load_state_dict(ckpt["model"])
    assert weights_fingerprint(model) == fingerprints[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "last.pt"]  # nothing from rank 1


def test_latency_aware_ranks_build_rank_zeros_structure(tmp_path):
    """latency_aware under DDP: rank 0 times the layers, the other rank takes its verdicts (a rank that
    decided on its own could build another structure: DDP would fail or train different models)."""
    cfg = ddp_config(include=["layer4.0.conv2", "fc"], rank_ratio=0.1, epochs=1, latency_aware=True)
    summary = train(cfg, checkpoint_dir=tmp_path)
    rows = {r["layer"]: r for r in summary["init_report"]}
    assert rows["layer4.0.conv2"]["status"] == "factored" and rows["fc"]["status"] == "kept_dense", rows
    assert summary["ranks_in_sync"] and summary["latency_policy"]["batch"] == 1
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "fc.weight" in ckpt["model"] and "layer4.0.conv2.weight" not in ckpt["model"]


def test_cancel_reaches_every_rank_and_bad_config_is_a_value_error(tmp_path):
    class StopNow(TrainCallbacks):
        def should_stop(self):
            return True

    # the stop request exists before the ranks start: every rank must stop at the first step
    # (a rank that missed rank 0's broadcast flag would hang in the next collective)
    with pytest.raises(TrainingCancelled, match="cancelled at epoch 1, step 0"):
        train(ddp_config(), checkpoint_dir=tmp_path, callbacks=StopNow())
    assert not (tmp_path / "last.pt").exists()
    # a batch too large for the data is found inside the ranks and comes back as the same ValueError
    with pytest.raises(ValueError, match="batch_size: 40 x 2 process"):
        train(ddp_config(batch_size=40))


def test_divergence_stops_every_rank_with_rank_0s_message(tmp_path):
    """lr 100: rank 0 sees a NaN loss (a step's, or the all-reduced val loss); its verdict is broadcast, every rank stops at that step (none hangs
    in a collective) and the caller gets rank 0's message as TrainingDiverged."""
    with pytest.raises(TrainingDiverged, match=r"^diverged at (epoch 1 step \d: loss|the end of epoch 1: val_loss) nan "
                                               r"\(started at [\d.]+\); lower lr \(now 100\)"):
        train(ddp_config(lr=100.0), checkpoint_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_trainer_and_launcher_import_no_cycle():
    """core.train and core.distributed share core.run_context; the launcher loads without the trainer."""
    import subprocess
    import sys

    code = ("import sys, core.distributed; print('core.train' in sys.modules); "
            "import core.train, core.run_context as rc; print(core.train.TrainingCancelled is rc.TrainingCancelled)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]

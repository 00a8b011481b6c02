"""Loading a trained source (core/source.py) and the compressed model's artifact (core/artifact.py)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from core.artifact import SPEC_KEY, load_compressed, save_compressed
from core.compress import CompressOptions, compress_model
from core.layers import FactoredConv2d
from core.models import build_model
from core.source import SourceError, load_source_model
from core.surgery import get_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def r18_state():
    """A resnet18 (10 classes) whose BN statistics are not the init's (so a wrong load would show)."""
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10)
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32))
    return net.eval().state_dict()


def _outputs(net: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return net.eval()(torch.randn(4, 3, 32, 32, generator=g))


def test_state_dict_files_load_and_infer_the_classifier(tmp_path, r18_state):
    save_file({k: v.contiguous() for k, v in r18_state.items()}, tmp_path / "w.safetensors")
    torch.save(r18_state, tmp_path / "w.pt")
    torch.save({"state_dict": r18_state}, tmp_path / "wrapped.pt")
    torch.save({f"module.{k}": v for k, v in r18_state.items()}, tmp_path / "ddp.pt")
    ref = build_model("resnet18", num_classes=10)
    ref.load_state_dict(r18_state)
    for name in ("w.safetensors", "w.pt", "wrapped.pt", "ddp.pt"):
        net, info = load_source_model(tmp_path / name, "resnet18")
        assert info.kind == "state_dict" and info.num_classes == 10 and info.small_input is False
        assert torch.equal(_outputs(net), _outputs(ref)), name
    assert any("module." in n for n in load_source_model(tmp_path / "ddp.pt", "resnet18")[1].notes)


def test_mismatches_name_the_first_key_and_the_missing_and_unexpected(tmp_path, r18_state):
    torch.save(r18_state, tmp_path / "w.pt")
    with pytest.raises(SourceError, match=r"first mismatched key 'fc.weight': file has shape \(10, 512\), "
                                          r"the model expects \(5, 512\)"):
        load_source_model(tmp_path / "w.pt", "resnet18", num_classes=5)
    with pytest.raises(SourceError, match=r"do not fit resnet34 .*: 80 missing key\(s\): 'layer1.2.conv1.weight'"):
        load_source_model(tmp_path / "w.pt", "resnet34")
    with pytest.raises(SourceError, match=r"first mismatched key 'conv1.weight'.*\(64, 3, 7, 7\).*\(64, 3, 3, 3\)"):
        load_source_model(tmp_path / "w.pt", "resnet18", small_input=True)
    extra = dict(r18_state, **{"head.weight": torch.zeros(2, 2)})
    del extra["layer4.1.bn2.running_var"]
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(SourceError, match=r"1 missing key\(s\): 'layer4.1.bn2.running_var'; "
                                          r"1 unexpected key\(s\): 'head.weight'"):
        load_source_model(tmp_path / "extra.pt", "resnet18")
    bad = dict(r18_state)
    bad["layer2.0.conv1.weight"] = bad["layer2.0.conv1.weight"].clone()
    bad["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(SourceError, match="'layer2.0.conv1.weight' has NaN/Inf"):
        load_source_model(tmp_path / "nan.pt", "resnet18")


def test_bad_files_are_one_clear_error(tmp_path, r18_state):
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.zeros(2)}, tmp_path / "pickled.pt")
    with pytest.raises(SourceError, match="not a readable torch file with weights_only=True"):
        load_source_model(tmp_path / "pickled.pt", "resnet18")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        load_source_model(tmp_path / "junk.safetensors", "resnet18")
    with pytest.raises(SourceError, match="file not found"):
        load_source_model(tmp_path / "missing.pt", "resnet18")
    (tmp_path / "w.npy").write_bytes(b"")
    with pytest.raises(SourceError, match="unsupported format '.npy'"):
        load_source_model(tmp_path / "w.npy", "resnet18")
    torch.save(r18_state, tmp_path / "w.pt")
    with pytest.raises(SourceError, match="model: a plain state_dict does not say its architecture"):
        load_source_model(tmp_path / "w.pt")
    with pytest.raises(SourceError, match="model must be one of"):
        load_source_model(tmp_path / "w.pt", "vgg16")


def test_small_input_is_read_off_a_resnet_stem(tmp_path):
    torch.manual_seed(2)
    small = build_model("resnet18", num_classes=7, small_input=True)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    net, info = load_source_model(tmp_path / "small.pt", "resnet18")
    assert info.small_input is True and info.num_classes == 7
    assert torch.equal(_outputs(net), _outputs(small))


def test_a_train_checkpoint_is_a_source(tmp_path):
    from core.train import train

    base = dict(model="resnet18", dataset="synthetic", image_size=16, synthetic_train_size=16, synthetic_val_size=8,
                batch_size=8, epochs=1, max_train_batches=1, max_val_batches=1, device="cpu", lr=0.01, init="dense")
    train(base, checkpoint_dir=tmp_path / "dense")
    ckpt = torch.load(tmp_path / "dense" / "last.pt", weights_only=True)
    net, info = load_source_model(tmp_path / "dense" / "last.pt")
    assert info.kind == "train_checkpoint" and info.model == "resnet18" and info.num_classes == 10
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ckpt["model"].items())
    with pytest.raises(SourceError, match="model: the checkpoint was trained with model='resnet18', got 'resnet50'"):
        load_source_model(tmp_path / "dense" / "last.pt", "resnet50")
    train(dict(base, rank_ratio=0.25, init="spectral"), checkpoint_dir=tmp_path / "factored")
    net, info = load_source_model(tmp_path / "factored" / "last.pt")
    assert isinstance(get_module(net, "layer1.0.conv1"), FactoredConv2d)
    assert any("factored train run" in n for n in info.notes)


def _loaders(n_fit: int = 16, n_held: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n_fit + n_held, 3, 32, 32, generator=g)
    return (DataLoader(TensorDataset(images[:n_fit]), batch_size=8),
            DataLoader(TensorDataset(images[n_fit:]), batch_size=8))


def test_compressed_artifact_round_trip(tmp_path, r18_state):
    torch.save(r18_state, tmp_path / "w.pt")
    dense, _ = load_source_model(tmp_path / "w.pt", "resnet18")
    fit, held = _loaders()
    opts = CompressOptions(method="whiten", rank_ratio=0.25, include=["layer1", "layer2.0.conv1"], positions_per_image=16)
    result = compress_model(dense, fit, held, opts)
    spec = save_compressed(tmp_path / "c.safetensors", result.model,
                           {"model": "resnet18", "num_classes": 10, "small_input": False},
                           extra={"contexts": result.contexts})
    ranks = {e["layer"]: e["rank"] for e in spec["factored"]}
    assert ranks == {r["layer"]: r["rank"] for r in result.report["layers"] if r["status"] == "factored"}
    assert len(ranks) == 5 and ranks["layer1.0.conv1"] == 16
    loaded, spec2 = load_compressed(tmp_path / "c.safetensors")
    assert spec2["factored"] == spec["factored"] and spec2["extra"]["contexts"]["layer1.0.conv1"]["bn"] == "layer1.0.bn1"
    assert torch.equal(_outputs(loaded), _outputs(result.model))
    assert not torch.allclose(_outputs(loaded), _outputs(dense))  # it is the compressed function
    again, info = load_source_model(tmp_path / "c.safetensors")  # a compressed model is a source too
    assert info.kind == "compressed" and torch.equal(_outputs(again), _outputs(result.model))
    # A tampered spec (a rank the weights do not have) is named, not loaded.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    spec["factored"][0]["rank"] = 3
    save_file(tensors, tmp_path / "bad.safetensors", metadata={SPEC_KEY: json.dumps(spec)})
    with pytest.raises(SourceError, match=r"first mismatched key 'layer1.0.conv1.v.weight'"):
        load_compressed(tmp_path / "bad.safetensors")
    with pytest.raises(SourceError, match="not a compressed model"):
        load_compressed(tmp_path / "w.pt")

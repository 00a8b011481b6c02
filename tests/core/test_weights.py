"""Weights from files and seeds; atomic factor files."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.weights import WeightsError, gaussian_weights, load_weights, save_factors


@pytest.fixture
def mat() -> np.ndarray:
    return np.arange(12, dtype=np.float32).reshape(3, 4) / 7


def test_npy(tmp_path, mat):
    p = tmp_path / "w.npy"
    np.save(p, mat)
    W = load_weights(str(p))
    assert W.dtype == torch.float32 and W.shape == (3, 4)
    np.testing.assert_array_equal(W.numpy(), mat)
    np.save(tmp_path / "w64.npy", mat.astype(np.float64))
    assert load_weights(str(tmp_path / "w64.npy")).dtype == torch.float64  # float64 stays float64
    np.save(tmp_path / "wi.npy", np.arange(6).reshape(2, 3))
    assert load_weights(str(tmp_path / "wi.npy")).dtype == torch.float32  # integers become float32
    with pytest.raises(WeightsError, match="no key is allowed"):
        load_weights(f"{p}:x")


def test_npz_single_and_keyed(tmp_path, mat):
    one = tmp_path / "one.npz"
    np.savez(one, only=mat)
    np.testing.assert_array_equal(load_weights(str(one)).numpy(), mat)
    many = tmp_path / "many.npz"
    np.savez(many, a=mat, b=2 * mat)
    np.testing.assert_array_equal(load_weights(f"{many}:b").numpy(), 2 * mat)
    with pytest.raises(WeightsError, match=r"holds 2 arrays; name one as .*:KEY, KEY one of 'a', 'b'"):
        load_weights(str(many))
    with pytest.raises(WeightsError, match=r"no key 'c'.*available: 'a', 'b'"):
        load_weights(f"{many}:c")


def test_safetensors(tmp_path, mat):
    p = tmp_path / "w.safetensors"
    save_file({"layer.weight": torch.from_numpy(mat), "layer.bias": torch.zeros(3)}, str(p))
    np.testing.assert_array_equal(load_weights(f"{p}:layer.weight").numpy(), mat)
    with pytest.raises(WeightsError, match="holds 2 arrays"):
        load_weights(str(p))
    with pytest.raises(WeightsError, match=r"expected a 2-D weight matrix \(m, d\), got shape \(3,\)"):
        load_weights(f"{p}:layer.bias")
    single = tmp_path / "s.safetensors"
    save_file({"w": torch.from_numpy(mat).double()}, str(single))
    assert load_weights(str(single)).dtype == torch.float64


def test_pt_tensor_and_state_dicts(tmp_path, mat):
    t = torch.from_numpy(mat)
    p = tmp_path / "t.pt"
    torch.save(t, p)
    assert torch.equal(load_weights(str(p)), t)
    with pytest.raises(WeightsError, match="single tensor"):
        load_weights(f"{p}:weight")
    sd = tmp_path / "sd.pt"
    torch.save({"fc.weight": t, "fc.bias": torch.zeros(3)}, sd)
    assert torch.equal(load_weights(f"{sd}:fc.weight"), t)
    with pytest.raises(WeightsError, match="holds 2 arrays"):
        load_weights(str(sd))
    nested = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"fc.weight": t}, "epoch": 3}, nested)
    assert torch.equal(load_weights(f"{nested}:state_dict.fc.weight"), t)
    assert torch.equal(load_weights(f"{nested}:fc.weight"), t)  # the wrapped key alone also works
    model = torch.nn.Linear(4, 3)
    mp = tmp_path / "model.pth"
    torch.save(model.state_dict(), mp)
    assert torch.equal(load_weights(f"{mp}:weight"), model.weight.detach())


def test_pt_refuses_pickled_objects(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2, 2), "obj": object()}, p)  # needs full unpickling
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_weights(f"{p}:w")


def test_conv_weight_is_rejected_with_its_shape(tmp_path):
    p = tmp_path / "conv.pt"
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, p)
    with pytest.raises(WeightsError, match=r"got shape \(8, 3, 3, 3\).*reshaped to \(out, in\*kh\*kw\)"):
        load_weights(f"{p}:conv.weight")


def test_non_finite_and_bad_files(tmp_path, mat):
    bad = mat.copy()
    bad[1, 1] = np.nan
    bad[0, 0] = np.inf
    p = tmp_path / "nan.npy"
    np.save(p, bad)
    with pytest.raises(WeightsError, match="2 NaN/Inf entries"):
        load_weights(str(p))
    with pytest.raises(WeightsError, match="not found"):
        load_weights(str(tmp_path / "missing.npy"))
    with pytest.raises(WeightsError, match="not found"):
        load_weights(f"{tmp_path / 'missing.npz'}:key")
    (tmp_path / "w.txt").write_text("1 2\n3 4\n")
    with pytest.raises(WeightsError, match="unsupported weights format '.txt'"):
        load_weights(str(tmp_path / "w.txt"))
    (tmp_path / "corrupt.npy").write_bytes(b"not numpy at all")
    with pytest.raises(WeightsError, match="corrupt.npy: cannot read weights"):
        load_weights(str(tmp_path / "corrupt.npy"))
    np.save(tmp_path / "cplx.npy", np.ones((2, 2), dtype=np.complex64))
    with pytest.raises(WeightsError, match="real numeric"):
        load_weights(str(tmp_path / "cplx.npy"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(WeightsError, match="empty"):
        load_weights(str(tmp_path / "empty.npy"))
    with pytest.raises(WeightsError, match="not a file"):
        load_weights(str(tmp_path))
    assert issubclass(WeightsError, ValueError)


def test_existing_path_with_colon_wins(tmp_path, mat):
    p = tmp_path / "odd:name.npy"
    np.save(p, mat)
    np.testing.assert_array_equal(load_weights(str(p)).numpy(), mat)


def test_gaussian_weights():
    W = gaussian_weights(400, 100, seed=3)
    assert W.shape == (400, 100) and W.dtype == torch.float32
    assert torch.equal(W, gaussian_weights(400, 100, seed=3))
    assert not torch.equal(W, gaussian_weights(400, 100, seed=4))
    assert W.double().var().item() == pytest.approx(1 / 100, rel=0.03)
    assert W.double().mean().item() == pytest.approx(0, abs=3 / math.sqrt(40_000) / 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            gaussian_weights(bad, 4, seed=0)


def test_save_factors_round_trip_and_overwrite(tmp_path):
    U, V = torch.randn(5, 2), torch.randn(2, 7)
    p = tmp_path / "f.safetensors"
    save_factors(p, U, V)
    got = load_file(str(p))
    assert set(got) == {"U", "V"}
    assert torch.equal(got["U"], U) and torch.equal(got["V"], V)
    save_factors(p, 2 * U, V)
    assert torch.equal(load_file(str(p))["U"], 2 * U)
    assert os.listdir(tmp_path) == ["f.safetensors"]  # no temporary files left behind
    with pytest.raises(ValueError, match="matching r"):
        save_factors(p, U, torch.randn(3, 7))


def test_save_factors_failure_leaves_old_file_intact(tmp_path, monkeypatch):
    import safetensors.torch as st

    p = tmp_path / "f.safetensors"
    U, V = torch.randn(4, 2), torch.randn(2, 3)
    save_factors(p, U, V)
    before = p.read_bytes()

    def disk_full(tensors, filename, metadata=None):  # writes part of the file, then fails
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_factors(p, 3 * U, V)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["f.safetensors"]

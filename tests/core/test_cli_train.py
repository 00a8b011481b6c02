"""`lowrank factorize` and `lowrank train`: --json shapes, tables, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank.cli import main

LOWRANK = str(Path(sys.executable).with_name("lowrank"))
TINY = ["--model", "resnet18", "--dataset", "synthetic", "--synthetic-train-size", "32",
        "--synthetic-val-size", "16", "--image-size", "16", "--batch-size", "16", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_factorize_json_compares_methods_per_layer(capsys):
    rc, out, err = run_cli(capsys, "factorize", "--model", "efficientnet_b0", "--rank-ratio", "0.25",
                           "--methods", "spectral,nkp", "--include", "features.2,features.3", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["methods"] == ["spectral", "nkp"] and result["rank_ratio"] == 0.25
    factored = [r for r in result["layers"] if r["status"] == "factored"]
    assert {r["layer"].split(".")[1] for r in factored} == {"2", "3"} and len(factored) >= 8
    for row in factored:
        assert {"layer", "rank", "params_dense", "params_factored", "error"} <= set(row)
        assert row["error"]["nkp"] <= row["error"]["spectral"] + 1e-9
        assert row["params_factored"] < row["params_dense"]
    totals = result["totals"]
    assert totals["params_factored"] < totals["params_dense"]
    assert set(totals["time_s"]) == {"spectral", "nkp"}
    assert totals["mean_error"]["nkp"] < totals["mean_error"]["spectral"]


def test_factorize_table(capsys):
    rc, out, err = run_cli(capsys, "factorize", "--model", "resnet18", "--rank", "8", "--methods", "random",
                           "--include", "layer1.0")
    assert rc == 0, err
    assert "layer1.0.conv1" in out and "layer1.0.conv2" in out and "layer2" not in out
    assert "2 of 21 layers factored" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg16", "--rank", "4"], "--model must be one of resnet18"),
    (["--model", "resnet18", "--rank-ratio", "1.5"], r"--rank-ratio must be in (0, 1], got 1.5"),
    (["--model", "resnet18", "--rank", "0"], "--rank must be an integer >= 1"),
    (["--model", "resnet18", "--rank", "4", "--methods", "spectral,svd"], "--methods must be a comma-separated list"),
    (["--model", "resnet18", "--rank", "4", "--include", "layer9"], "include: no Conv2d/Linear layer named 'layer9'"),
    (["--model", "resnet18"], "one of the arguments --rank --rank-ratio is required"),
    (["--model", "resnet18", "--rank", "x"], "invalid int value"),
])
def test_factorize_bad_input_exits_2_with_one_line(capsys, argv, message):
    rc, out, err = run_cli(capsys, "factorize", *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_train_json_then_resume_mismatch(capsys, tmp_path):
    ckpt = str(tmp_path / "ck")
    rc, out, err = run_cli(capsys, "train", *TINY, "--rank-ratio", "0.25", "--init", "spectral", "--epochs", "1",
                           "--include", "layer1,layer2", "--lr", "0.05", "--seed", "2", "--checkpoint-dir", ckpt,
                           "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert {"val_top1", "params_dense", "params_factored", "epochs"} <= set(summary)
    assert summary["epochs"] == 1 and summary["params_factored"] < summary["params_dense"]
    assert "epoch 1/1" in err and "val_top1" in err
    assert (tmp_path / "ck" / "last.pt").exists()
    # resuming with another lr is refused, on one line naming the field
    rc, out, err = run_cli(capsys, "train", *TINY, "--rank-ratio", "0.25", "--init", "spectral", "--epochs", "1",
                           "--include", "layer1,layer2", "--lr", "0.1", "--seed", "2", "--checkpoint-dir", ckpt,
                           "--resume")
    assert rc == 2 and err.count("\n") == 1 and "differing field(s): lr" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "batch_size must be in [1, 65536], got 0"),
    (["--lr", "fast"], "--lr must be a number, got 'fast'"),
    (["--amp", "bf16"], "amp='bf16' needs a CUDA device"),
    (["--init", "svd", "--rank", "4"], "init must be one of spectral, rescale, nkp, random, dense"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/data"], "cifar10: not found at /nonexistent/data"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--include", "layer9", "--rank", "4"], "include: no Conv2d/Linear layer named 'layer9'"),
    (["--rank", "1000"], "rank 1000 factorizes no layer of resnet18"),
    (["--rank-ratio", "0.9", "--include", "layer1"], "rank_ratio 0.9 factorizes no layer of the included layers"),
    ([], "init='nkp' factorizes the model: give exactly one of rank or rank_ratio"),
])
def test_train_bad_input_exits_2_with_one_line(capsys, argv, message):
    base = TINY[:2] if "--dataset" in argv else TINY
    dense = [] if {"--rank", "--rank-ratio", "--init"} & set(argv) or not argv else ["--init", "dense"]
    rc, out, err = run_cli(capsys, "train", *base, "--epochs", "1", *dense, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_train_config_file_with_unknown_key(capsys, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": "resnet18", "epochz": 3}))
    rc, _, err = run_cli(capsys, "train", "--config", str(path))
    assert rc == 2 and "unknown train config key(s): epochz" in err and err.count("\n") == 1


def test_console_script_and_light_imports(tmp_path):
    # the real entry point: exit code 2 and one line on stderr
    proc = subprocess.run([LOWRANK, "train", "--model", "resnet18", "--epochs", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "epochs must be >= 1" in proc.stderr
    # registering the sub-commands (what `lowrank --help` does) does not import torch
    code = "import sys, lowrank.cli; lowrank.cli.build_parser(); print('torch' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr


def test_train_that_diverges_exits_1_with_one_line_saying_what_to_change(capsys):
    rc, out, err = run_cli(capsys, "train", *TINY, "--rank", "4", "--include", "layer1", "--lr", "100",
                           "--epochs", "2", "--json")
    assert rc == 1 and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("error: diverged at ") and last.endswith("lower lr (now 100) or warm up longer "
                                                                   "(warmup_epochs now 0.5)"), err


def test_train_prints_the_chance_level_warning(capsys):
    rc, out, err = run_cli(capsys, "train", *TINY, "--init", "dense", "--lr", "1e-6", "--epochs", "1",
                           "--synthetic-val-size", "256", "--warmup-epochs", "0")
    assert rc == 0, err
    assert out.splitlines()[-1].startswith("warning: val_top1 0.") and "is at chance level: 10 classes" in out

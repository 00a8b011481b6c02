"""README.md's `lowrank submit train ...` command, exactly as written there, against the real API and worker:
the job succeeds with the documented accuracy and its stored spec holds the recipe's resolved values."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.service, pytest.mark.slow]
_helper = importlib.util.spec_from_file_location("readme_commands", Path(__file__).parents[1] / "readme_commands.py")
readme_commands = importlib.util.module_from_spec(_helper)
_helper.loader.exec_module(readme_commands)


@pytest.mark.timeout(900)
def test_readme_submit_train_succeeds_with_the_recipe(api_server, worker_process, client, tmp_path):
    from core.recipes import recipe_values

    argv = readme_commands.find(["lowrank", "submit", "train"])
    assert "--wait" in argv  # the README shows the outcome, so the command waits for it
    env = {k: v for k, v in os.environ.items() if k not in ("LOWRANK_URL", "LOWRANK_TOKEN")}
    env["LOWRANK_URL"] = api_server.url  # the README: `--url`/`LOWRANK_URL`
    lowrank = Path(sys.executable).with_name("lowrank")
    proc = subprocess.run([str(lowrank), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=880)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, worker_process.logs()[-3000:])
    job_id, status = proc.stdout.split()[:2]
    assert status == "succeeded"
    assert float(re.search(r"val_top1=([\d.]+)", proc.stdout)[1]) >= 0.90, proc.stdout
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result"]["val_top1"] >= 0.90 and job["result"]["warnings"] == []
    spec = job["spec"]
    model = argv[argv.index("--model") + 1]
    assert spec["recipe"] == "digits"
    assert {k: spec[k] for k in recipe_values("digits", model)} == recipe_values("digits", model)
    assert spec["small_input"] is True and job["result"]["config"]["lr"] == spec["lr"]
    print(f"\nREADME submit train: val_top1 {job['result']['val_top1']:.4f}, "
          f"{job['result']['wall_time_s']:.0f} s of training")

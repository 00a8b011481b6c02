"""The API process never imports torch (it starts fast and its image stays small), nor worker/; of core/ only
the torch-free modules that define what a train or compress job accepts (names, recipes, training and compress
fields, layer and state_dict tables)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# jobs/specs.py validates train and compress specs with these, jobs/compress_sources.py checks an uploaded
# state_dict with core.model_state, jobs/paired.py computes intervals with core.paired (each is torch-free:
# tests/core/test_model_layers.py)
TORCH_FREE_CORE = {"core", "core.names", "core.recipes", "core.train_fields", "core.model_layers", "core.paired",
                   "core.compress_fields", "core.model_state"}


def test_importing_the_api_does_not_import_torch(tmp_path) -> None:
    # Build the app and its OpenAPI schema (imports every route and schema), then list the loaded
    # top-level packages of interest and core's modules. `jobs` must be there: proof the probe sees
    # what was imported.
    code = ("import sys, json, api.main; api.main.create_app().openapi(); "
            "print(json.dumps([sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'core', 'worker', 'jobs', 'api'}), "
            "sorted(m for m in sys.modules if m.split('.')[0] == 'core')]))")
    env = {"PATH": "/usr/bin:/bin", "LOWRANK_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    packages, core_modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert packages == ["api", "core", "jobs"]
    assert set(core_modules) <= TORCH_FREE_CORE, set(core_modules) - TORCH_FREE_CORE

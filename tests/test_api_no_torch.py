"""The API process never imports torch (it starts fast and its image stays small), nor core/ or worker/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_api_does_not_import_torch(tmp_path) -> None:
    # Build the app and its OpenAPI schema (imports every route and schema), then list the loaded
    # top-level packages of interest. `jobs` must be there: proof the probe sees what was imported.
    code = ("import sys, json, api.main; api.main.create_app().openapi(); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'core', 'worker', 'jobs', 'api'})))")
    env = {"PATH": "/usr/bin:/bin", "LOWRANK_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["api", "jobs"]

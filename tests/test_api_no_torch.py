"""The API process never imports torch (it starts fast and its image stays small), nor core/ or worker/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_api_does_not_import_torch(tmp_path) -> None:
    code = ("import sys, json, api.main; app = api.main.create_app(); app.openapi(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'core', 'worker', 'torchvision'))))")
    env = {"PATH": "/usr/bin:/bin", "LOWRANK_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    # The check has teeth: the same probe sees torch when something does import it.
    probe = ("import sys, torch; print('torch' in sys.modules)")
    seen = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert seen.stdout.strip() == "True"

"""docker/Dockerfile.api, docker/Dockerfile.worker and .dockerignore, checked structurally (no
Docker engine runs here): stages, what is installed where, the user, what the build context holds.

The API image's promise (no torch) is also checked by behaviour: its packages (api, jobs, lowrank,
migrations, and core/'s torch-free modules) are imported and its commands run with torch, worker/ and
the rest of core/ made unimportable.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
API, WORKER = DOCKER / "Dockerfile.api", DOCKER / "Dockerfile.worker"


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (the parser directive
    line `# syntax=` included)."""
    out: list[Instruction] = []
    stage = -1
    buf = ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        text = (buf + line).strip()
        buf = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    return out


def stages(instrs: list[Instruction]) -> list[str]:
    return [re.search(r"\bAS\s+(\S+)", i.args, flags=re.I).group(1) for i in instrs if i.keyword == "FROM"]


def final(instrs: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instrs)
    return [i for i in instrs if i.stage == last]


def runs(instrs: list[Instruction]) -> str:
    return "\n".join(i.args for i in instrs if i.keyword == "RUN")


def copy_sources(instrs: list[Instruction]) -> list[str]:
    srcs = []
    for i in instrs:
        if i.keyword == "COPY" and "--from=" not in i.args:
            parts = [p for p in i.args.split() if not p.startswith("--")]
            srcs += parts[:-1]
    return srcs


def resolve_args(instrs: list[Instruction], text: str) -> str:
    defaults = dict(re.findall(r"^(\w+)=(\S*)$", "\n".join(i.args for i in instrs if i.keyword == "ARG"), re.M))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


@pytest.fixture(scope="module", params=["api", "worker"])
def image(request: pytest.FixtureRequest) -> tuple[str, list[Instruction]]:
    return request.param, parse(API if request.param == "api" else WORKER)


# ------------------------------------------------------------------------------------ both images


def test_multi_stage_build_then_runtime(image: tuple[str, list[Instruction]]) -> None:
    name, instrs = image
    assert stages(instrs) == ["build", "runtime"], name
    froms = [resolve_args(instrs, i.args) for i in instrs if i.keyword == "FROM"]
    assert all(f.startswith("python:3.11-slim") for f in froms), froms
    rt = final(instrs)
    # The runtime stage takes the finished virtualenv and installs nothing itself.
    assert any(i.keyword == "COPY" and "--from=build" in i.args and "/opt/venv" in i.args for i in rt)
    assert "pip install" not in runs(rt)
    assert not copy_sources(rt), "sources are installed in the build stage only"
    # The pip cache never lands in a layer.
    assert "--mount=type=cache,target=/root/.cache/pip" in runs(instrs)


def test_runs_as_a_non_root_user(image: tuple[str, list[Instruction]]) -> None:
    name, instrs = image
    rt = final(instrs)
    users = [resolve_args(instrs, i.args) for i in rt if i.keyword == "USER"]
    assert users, f"{name}: no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), name
    # USER comes after the last RUN (which needs root for useradd/chown) and before CMD.
    idx = {id(i): n for n, i in enumerate(rt)}
    last_user = max(idx[id(i)] for i in rt if i.keyword == "USER")
    assert all(idx[id(i)] < last_user for i in rt if i.keyword == "RUN")
    assert all(idx[id(i)] > last_user for i in rt if i.keyword == "CMD")
    assert re.search(r'useradd .*--uid "?\$\{APP_UID\}"?', runs(rt)), name
    assert "chown lowrank:lowrank /data/artifacts" in runs(rt)


def test_same_uid_in_both_images() -> None:
    """Both write and read the shared artifact volume."""
    uids = {p.name: re.search(r"^ARG APP_UID=(\d+)$", p.read_text(), flags=re.M).group(1) for p in (API, WORKER)}
    assert len(set(uids.values())) == 1, uids
    assert int(next(iter(uids.values()))) >= 1000


def test_no_secrets_baked_in(image: tuple[str, list[Instruction]]) -> None:
    name, instrs = image
    for i in instrs:
        if i.keyword in ("ENV", "ARG"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|DATABASE_URL|BROKER_URL", i.args, flags=re.I), (name, i)


def test_copied_sources_exist_and_pass_dockerignore(image: tuple[str, list[Instruction]]) -> None:
    name, instrs = image
    for src in copy_sources(instrs):
        path = ROOT / src
        assert path.exists(), f"{name}: COPY {src}: no such path"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignored(rel), f"{name}: {rel} is copied but .dockerignore excludes it"


def test_readme_travels_with_pyproject() -> None:
    """setuptools reads pyproject's `readme` while building: it must be in the build stage."""
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    for path in (API, WORKER):
        copied = copy_sources(parse(path))
        assert "pyproject.toml" in copied and readme in copied, path.name


def test_alembic_config_ships_inside_the_package() -> None:
    """The images hold the installed package only: alembic.ini must be package data of migrations/."""
    assert (ROOT / "migrations" / "alembic.ini").is_file()
    assert not (ROOT / "alembic.ini").exists()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.ini" in package_data["*"]
    from jobs import migrate

    assert (ROOT / "migrations").resolve() == migrate.MIGRATIONS_DIR


# ------------------------------------------------------------------------------------ API image


def test_api_image_never_installs_torch() -> None:
    instrs = parse(API)
    text = API.read_text()
    pip = [ln for ln in runs(instrs).splitlines() if "pip install" in ln]
    assert pip, "no pip install in Dockerfile.api"
    for ln in pip:
        assert re.search(r"pip install \.(\s|$)", ln), f"the API installs the project without extras: {ln}"
        assert "[" not in ln and "torch" not in ln and "worker" not in ln, ln
    # Code comments may explain it; instructions never name torch or the worker extra.
    assert not re.search(r"torch|\[worker\]", "\n".join(f"{i.keyword} {i.args}" for i in instrs))
    copied = {s.rstrip("/") for s in copy_sources(instrs)}
    assert copied == {"pyproject.toml", "README.md", "api", "jobs", "lowrank", "migrations"} | API_CORE_FILES, copied
    assert "core" not in copied and "worker" not in copied
    # What comes of core/ is torch-free: the app imports with torch blocked (below) and
    # tests/core/test_model_layers.py imports each module alone.
    # And the project's base dependencies (what `pip install .` brings) have no torch either.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"(torch|torchvision|scikit-learn)\b", d)], deps
    assert "LOWRANK_AUTH=required" in text


def test_api_image_cmd_and_healthcheck() -> None:
    instrs = parse(API)
    (cmd,) = [i.args for i in instrs if i.keyword == "CMD"]
    assert cmd == '["lowrank", "api", "--host", "0.0.0.0", "--port", "8000"]'
    assert any(i.keyword == "EXPOSE" and i.args == "8000" for i in instrs)
    (hc,) = [i.args for i in instrs if i.keyword == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/readyz" in hc


# core/ files the API image copies (jobs/specs.py validates train specs with them).
API_CORE_FILES = {s for s in copy_sources(parse(API)) if s.startswith("core/")}
_API_CORE_MODULES = sorted({"core"} | {f[:-3].replace("/", ".") for f in API_CORE_FILES if f.endswith(".py")} - {"core.__init__"})

# Makes torch, worker/, the core/ modules the API image lacks (and the other `worker` extra packages)
# unimportable, like in the API image, then runs what that image runs.
_BLOCK = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {{"torch", "torchvision", "sklearn", "core", "worker"}}
    IN_IMAGE = set({_API_CORE_MODULES!r})
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED and name not in IN_IMAGE:
                raise ImportError(f"{{name}} is not in the API image")
    sys.meta_path.insert(0, Block())
""")


@pytest.mark.parametrize("argv", [["--help"], ["api", "--help"], ["db", "upgrade", "--help"]])
def test_api_image_commands_run_without_torch_core_worker(argv: list[str]) -> None:
    code = _BLOCK + f"from lowrank.cli import main\nsys.exit(main({argv!r}))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("usage: lowrank")


def test_api_app_and_migrations_import_without_torch_core_worker(tmp_path: Path) -> None:
    code = _BLOCK + textwrap.dedent("""
        import api.main, api.routes.prometheus, jobs.migrate, jobs.stats
        from jobs import migrate
        migrate.upgrade("sqlite:///" + sys.argv[1])  # what `lowrank db upgrade` does, on SQLite here
        assert migrate.is_at_head("sqlite:///" + sys.argv[1])
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and m not in IN_IMAGE))
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "db.sqlite")], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", "LOWRANK_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok []"


# ------------------------------------------------------------------------------------ worker image


def test_worker_image_installs_the_worker_extra() -> None:
    instrs = parse(WORKER)
    pip = [ln for ln in runs(instrs).splitlines() if "pip install" in ln]
    assert len(pip) == 1 and '".[worker]"' in pip[0], pip
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    assert any(d.startswith("torch") for d in extra)
    copied = {s.rstrip("/") for s in copy_sources(instrs)}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    # Every package the project installs is in the worker's build context.
    assert {p.rstrip("*") for p in packages} <= copied
    env = " ".join(i.args for i in final(instrs) if i.keyword == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env  # utility: nvidia-smi for --gpus all
    (cmd,) = [i.args for i in instrs if i.keyword == "CMD"]
    assert cmd == '["lowrank", "worker", "--queues", "gpu", "--gpus", "all"]'


# ------------------------------------------------------------------------------------ .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def dockerignored(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern_regex(line.lstrip("!").strip("/"))))
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "api/main.py", "api/routes/prometheus.py", "jobs/settings.py",
    "lowrank/cli/__init__.py", "migrations/alembic.ini", "migrations/env.py", "worker/launcher.py",
    "core/__init__.py",
])
def test_build_context_keeps(path: str) -> None:
    assert not dockerignored(path)


@pytest.mark.parametrize("path", [
    ".env", ".git/HEAD", ".venv/bin/python", ".lowrank/lowrank.db", "tests/deploy/test_compose.py",
    "docs/results/x.md", "bench/run.py", "api/__pycache__/main.cpython-311.pyc", "jobs/x.pyc",
    "lowrank_lab.egg-info/PKG-INFO", "docker-compose.yml", "deploy/slurm/worker.sbatch", "artifacts/j/f.bin",
    "api/.env",
])
def test_build_context_drops(path: str) -> None:
    assert dockerignored(path)

"""docker-compose.yml, checked structurally (no Docker engine runs here).

Parsed with PyYAML (anchors and `<<` merges resolved as Compose resolves them); `${VAR...}`
interpolation is applied by a small implementation of Compose's rules so the secrets' handling and
the resulting URLs can be checked; every command of our images is parsed by the real `lowrank`
CLI and run here with `--help`. When a Compose binary is installed, `config` validates the file too.
"""
from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
OUR_SERVICES = ("migrate", "api", "worker-gpu", "worker-cpu")  # built from docker/Dockerfile.*
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH")
SECRET_ENV = {"POSTGRES_PASSWORD": "a1b2c3pg", "REDIS_PASSWORD": "d4e5f6redis", "FLOWER_BASIC_AUTH": "admin:f1"}


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(raw: str) -> dict[str, Any]:
    return yaml.safe_load(raw)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


# ------------------------------------------------------------------------------------ interpolation

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every string in `value`: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
    ${VAR:?err}, ${VAR?err} (":" forms treat an empty value as unset)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = m.group("braced")
        op = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?$", expr, flags=re.S)
        assert op, f"bad interpolation ${{{expr}}}"
        name, kind, arg = op.group(1), op.group(2), op.group(3)
        current = env.get(name)
        unset = current is None or (kind is not None and kind.startswith(":") and current == "")
        if kind in ("-", ":-"):
            return arg if unset else current
        if kind in ("?", ":?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return current
        return current or ""

    return _VAR.sub(repl, value)


def references(raw: str) -> list[tuple[str, str | None, str]]:
    """(name, operator or None, argument) of every ${...} in the file."""
    out = []
    for m in re.finditer(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", raw):
        out.append((m.group(1), m.group(2), m.group(3) or ""))
    return out


def test_secrets_come_from_the_environment_with_no_default(raw: str, services: dict[str, Any]) -> None:
    refs = references(raw)
    names = {n for n, _, _ in refs}
    assert set(SECRETS) <= names
    for name, op, arg in refs:
        if re.search(r"PASSWORD|SECRET|TOKEN|AUTH|KEY", name):
            # Required and non-empty, with a message saying what to set; never a default.
            assert op == ":?", f"${{{name}}} must be written ${{{name}:?message}}, found {op!r}"
            assert arg.strip(), f"${{{name}:?}} needs a message"
    # No literal secret anywhere: the password settings are interpolations only.
    pg_env = services["postgres"]["environment"]
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


@pytest.mark.parametrize("missing", SECRETS)
def test_a_missing_secret_stops_compose(compose: dict[str, Any], missing: str) -> None:
    env = {k: v for k, v in SECRET_ENV.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        interpolate(compose, env)
    with pytest.raises(MissingVariable, match=missing):  # empty counts as unset
        interpolate(compose, {**env, missing: ""})


def test_urls_carry_the_secrets(compose: dict[str, Any]) -> None:
    svc = interpolate(compose, SECRET_ENV)["services"]
    for name in OUR_SERVICES:
        env = svc[name]["environment"]
        db = make_url(env["LOWRANK_DATABASE_URL"])
        assert (db.drivername, db.username, db.password, db.host, db.port, db.database) == (
            "postgresql+psycopg", "lowrank", "a1b2c3pg", "postgres", 5432, "lowrank"), name
        assert env["LOWRANK_BROKER_URL"] == "redis://:d4e5f6redis@redis:6379/0", name
        assert env["LOWRANK_ARTIFACT_ROOT"] == "/data/artifacts", name
    pg = svc["postgres"]["environment"]
    assert (pg["POSTGRES_USER"], pg["POSTGRES_DB"], pg["POSTGRES_PASSWORD"]) == ("lowrank", "lowrank", "a1b2c3pg")
    cmd = svc["redis"]["command"]
    assert cmd[cmd.index("--requirepass") + 1] == "d4e5f6redis"
    assert svc["redis"]["environment"]["REDISCLI_AUTH"] == "d4e5f6redis"
    assert svc["flower"]["environment"]["CELERY_BROKER_URL"] == "redis://:d4e5f6redis@redis:6379/0"


def test_lowrank_settings_are_real_and_valid(compose: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LOWRANK_* variable compose sets names a Settings field (Settings ignores unknown
    variables, so a typo would pass silently) and the values validate."""
    from jobs.settings import Settings

    fields = {f"LOWRANK_{name.upper()}" for name in Settings.model_fields}
    svc = interpolate(compose, SECRET_ENV)["services"]
    for name in OUR_SERVICES:
        env = {k: v for k, v in svc[name]["environment"].items() if k.startswith("LOWRANK_")}
        assert set(env) <= fields, (name, set(env) - fields)
        for k in [k for k in os.environ if k.startswith("LOWRANK_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = Settings(home=tmp_path)
        assert settings.database_url.startswith("postgresql+psycopg://lowrank:"), name
        assert str(settings.artifact_root) == "/data/artifacts", name
        assert [str(p) for p in settings.data_roots] == ["/data/datasets"], name
        assert settings.auth == ("required" if name == "api" else "off"), name


# ------------------------------------------------------------------------------------ services


def test_services_present(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu", "flower"}
    for name in OUR_SERVICES:
        dockerfile = services[name]["build"]["dockerfile"]
        assert (ROOT / services[name]["build"]["context"] / dockerfile).is_file(), name
    assert services["migrate"]["build"]["dockerfile"] == "docker/Dockerfile.api"  # no torch needed
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert services["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert services["worker-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.worker"


def test_postgres(services: dict[str, Any], compose: dict[str, Any]) -> None:
    pg = services["postgres"]
    volume, target = pg["volumes"][0].split(":")[:2]
    assert target == "/var/lib/postgresql/data"
    assert volume in compose["volumes"]  # a named volume, not a bind mount
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready"
    assert test[test.index("-U") + 1] == pg["environment"]["POSTGRES_USER"]
    assert test[test.index("-d") + 1] == pg["environment"]["POSTGRES_DB"]


def test_redis(services: dict[str, Any], compose: dict[str, Any]) -> None:
    rd = services["redis"]
    cmd = rd["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    volume, target = rd["volumes"][0].split(":")[:2]
    assert (volume in compose["volumes"], target) == (True, "/data")
    assert "redis-cli ping" in " ".join(rd["healthcheck"]["test"])


def test_healthchecks_everywhere_it_matters(services: dict[str, Any]) -> None:
    for name in ("postgres", "redis", "api"):
        hc = services[name]["healthcheck"]
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert {"interval", "timeout", "retries"} <= set(hc), name


def test_migrate_runs_once_before_api_and_workers(services: dict[str, Any]) -> None:
    mig = services["migrate"]
    assert mig["command"] == ["lowrank", "db", "upgrade"]
    assert mig["restart"] == "no"
    assert mig["healthcheck"] == {"disable": True}  # the API image's /readyz check is not for a one-shot job
    assert mig["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert services[name]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name


def test_api(services: dict[str, Any]) -> None:
    api = services["api"]
    cmd = api["command"]
    assert cmd[:2] == ["lowrank", "api"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert api["environment"]["LOWRANK_AUTH"] == "required"  # non-loopback bind
    # Processes and handler threads: defaults, overridable from the host's environment.
    assert interpolate(api["environment"]["LOWRANK_API_PROCESSES"], {}) == "2"
    assert interpolate(api["environment"]["LOWRANK_API_PROCESSES"], {"LOWRANK_API_PROCESSES": "8"}) == "8"
    assert interpolate(api["environment"]["LOWRANK_API_THREADS"], {}) == "4"
    assert any(p.endswith(":8000") for p in api["ports"])
    assert "http://127.0.0.1:8000/readyz" in " ".join(api["healthcheck"]["test"])


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_api_healthcheck_command(services: dict[str, Any], status: int | None, healthy: bool) -> None:
    """The healthcheck's own command, run here against a server answering /readyz with `status`
    (None: nothing listening)."""
    test = services["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    server = http.server.HTTPServer(("127.0.0.1", 0), type("H", (_Readyz,), {"status": status or 200}))
    port = server.server_address[1]
    if status is None:
        server.server_close()
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = test[3].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (r.returncode == 0) is healthy, r.stderr


def test_api_and_workers_share_the_artifact_volume(services: dict[str, Any], compose: dict[str, Any]) -> None:
    for name in ("api", "worker-gpu", "worker-cpu"):
        mounts = [v.split(":") for v in services[name]["volumes"]]
        assert ["artifacts", "/data/artifacts"] in [m[:2] for m in mounts], name
    assert "artifacts" in compose["volumes"]


def test_gpu_worker(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["command"] == ["lowrank", "worker", "--queues", "gpu", "--gpus", "all"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == "all"
    assert device["capabilities"] == ["gpu"]
    assert gpu["init"] is True  # tini forwards docker stop's TERM and reaps the launcher's children
    assert "shm_size" in gpu  # DataLoader workers share batches through /dev/shm
    cpu = services["worker-cpu"]
    assert cpu["command"] == ["lowrank", "worker", "--queues", "cpu"]
    assert "deploy" not in cpu


def test_flower_only_under_the_ops_profile(services: dict[str, Any]) -> None:
    assert services["flower"]["profiles"] == ["ops"]
    assert all("profiles" not in s for n, s in services.items() if n != "flower")
    # Its UI is published on loopback only.
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])


# ------------------------------------------------------------------------------------ commands


def test_console_script_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["lowrank"] == "lowrank.cli:main"
    assert (VENV_BIN / "lowrank").is_file()


def _subcommand_path(argv: list[str]) -> list[str]:
    path = []
    for tok in argv[1:]:
        if tok.startswith("-"):
            break
        path.append(tok)
    return path


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_command_is_a_real_lowrank_subcommand(services: dict[str, Any], service: str) -> None:
    argv = services[service]["command"]
    assert argv[0] == "lowrank", f"{service}: our images run the `lowrank` console script"
    from lowrank.cli import build_parser

    args = build_parser().parse_args(argv[1:])  # the whole command line parses (SystemExit 2 if not)
    assert callable(args.handler)
    r = subprocess.run([str(VENV_BIN / "lowrank"), *_subcommand_path(argv), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lowrank " + " ".join(_subcommand_path(argv)))
    for opt in (t for t in argv[1:] if t.startswith("--")):
        assert opt in r.stdout, f"{service}: {opt} not in `lowrank {' '.join(_subcommand_path(argv))} --help`"


def test_gpu_worker_command_starts_one_worker_per_visible_gpu(services: dict[str, Any], tmp_path: Path) -> None:
    """In the container no CUDA_VISIBLE_DEVICES is set: `--gpus all` lists GPUs with nvidia-smi,
    which the NVIDIA toolkit mounts in (capability `utility`). A stand-in nvidia-smi lists 2."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 9\n"
                   "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tmp_path}:{env.get('PATH', '')}"
    argv = services["worker-gpu"]["command"]
    r = subprocess.run([str(VENV_BIN / "lowrank"), *argv[1:], "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert [re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", ln).group(1) for ln in lines] == ["0", "1"]
    assert all("gpu.high" in ln and "cpu." not in ln for ln in lines)


# ------------------------------------------------------------------------------------ compose itself


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates(tmp_path: Path, unavailable) -> None:
    cli = _compose_cli()
    if cli is None:
        unavailable("no Compose binary (docker compose / docker-compose) is installed (`make tools`)")
    path = COMPOSE_FILE
    if cli[0].endswith("docker-compose"):
        # Compose v1 (Debian's docker-compose 1.29) predates the top-level `name:` key.
        path = tmp_path / "docker-compose.yml"
        path.write_text(re.sub(r"^name: .*$", "", COMPOSE_FILE.read_text(), flags=re.M))
    base = [*cli, "-f", str(path), "--project-directory", str(ROOT)]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **SECRET_ENV}
    r = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    env.pop("REDIS_PASSWORD")
    r = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "REDIS_PASSWORD" in r.stdout + r.stderr

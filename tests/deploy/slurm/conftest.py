"""Fixtures of the Slurm tests: a private single-node Slurm cluster, and the real service it serves.

  slurm           package   SlurmCluster (slurmlib.py): munged, slurmctld and slurmd on this machine,
                            its real CPUs and memory, 2 fake GPUs; stopped by pid when the last test
                            here is done
  service_env     package   tests/service/conftest.py's session environment (a fresh Postgres
                            database, a unique queue prefix on the shared Redis, an artifact folder,
                            LOWRANK_* in os.environ), here set up and torn down around this package,
                            so the variables do not outlive it into other folders' tests
  api_server      package   its live API (uvicorn) on that environment
  client, wait_job, unique_tag: tests/service's own

The cluster FAILS the tests when it cannot start (never skips): `make test` installs its Debian
packages, and .ci/run (LOWRANK_TEST_REQUIRE_SERVICES=1) must run these tests.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm.slurmlib import SlurmCluster, load_service_helpers

svc = load_service_helpers()
_services_reachable = svc._services_reachable
_log_dir = svc._log_dir
client = svc.client
wait_job = svc.wait_job
unique_tag = svc.unique_tag


# The same fixture bodies as tests/service's (__wrapped__: the undecorated generator), package-scoped.
@pytest.fixture(scope="package", autouse=True)
def service_env(_services_reachable: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from svc.service_env.__wrapped__(_services_reachable, tmp_path_factory)


@pytest.fixture(scope="package")
def api_server(service_env: dict[str, str], _log_dir: Path) -> Iterator[object]:
    yield from svc.api_server.__wrapped__(service_env, _log_dir)


@pytest.fixture(scope="package")
def slurm() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(gpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

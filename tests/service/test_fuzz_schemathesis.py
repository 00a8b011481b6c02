"""Fuzz every operation of the live API's /openapi.json with schemathesis (bounded examples).

A real uvicorn API with LOWRANK_AUTH=required (queue prefix no worker consumes) is called with an
admin token; checks: no 5xx, status codes, content types, headers and bodies conform to the
schema, and bad input is rejected. `positive_data_acceptance` is left out on purpose: a body can
match the schema and still be refused with 422 for stored-data reasons (an upload id that does
not exist, a rank above the uploaded matrix's min(m, d)); those 422s are by design.
"""
from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import CHECKS

from jobs import auth

pytestmark = pytest.mark.service

EXAMPLES = int(os.environ.get("LOWRANK_FUZZ_EXAMPLES", "12"))  # per operation; keeps the test under ~60 s
EXCLUDED = {"positive_data_acceptance"}


@pytest.fixture(scope="module")
def fuzz_api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    from test_auth import _start_uvicorn, _stop  # same folder (rootdir-relative import)

    env = {"LOWRANK_AUTH": "required", "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}fuzz."}
    proc, url = _start_uvicorn("127.0.0.1", "127.0.0.1", env, tmp_path_factory.mktemp("fuzz") / "api.log")
    try:
        yield url
    finally:
        _stop(proc)


def test_fuzz_openapi(fuzz_api: str) -> None:
    _, token = auth.create_token("fuzzer", admin=True)
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(f"{fuzz_api}/openapi.json")
    excluded = [c for c in CHECKS.get_all() if c.__name__ in EXCLUDED]
    failures: dict[str, str] = {}
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=fuzz_api, headers=headers, excluded_checks=excluded, timeout=30)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report all
            failures[operation.label] = str(exc)[:3000]
    assert calls > 0
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    # The API is still healthy afterwards.
    assert httpx.get(f"{fuzz_api}/readyz", timeout=10).status_code == 200

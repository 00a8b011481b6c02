"""Shared by every test directory: how a test says that this machine cannot run it."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

import pytest


def services_required() -> bool:
    """LOWRANK_TEST_REQUIRE_SERVICES=1 (.ci/run sets it): everything the suite needs must be here."""
    return os.environ.get("LOWRANK_TEST_REQUIRE_SERVICES") == "1"


@pytest.fixture
def unavailable() -> Callable[[str], NoReturn]:
    """unavailable(reason): skip this test, or FAIL it with the reason under LOWRANK_TEST_REQUIRE_SERVICES=1,
    where a missing tool or address is a broken machine, never a silent skip."""

    def stop(reason: str) -> NoReturn:
        if services_required():
            pytest.fail(f"{reason} (LOWRANK_TEST_REQUIRE_SERVICES=1: required, not skipped)", pytrace=False)
        pytest.skip(reason)

    return stop

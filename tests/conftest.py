"""Shared by every test directory: how a test says that this machine cannot run it, and one torch thread."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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


def _one_torch_thread() -> Iterator[None]:
    # Small tensors on a few cores shared by several test processes: OpenMP thread hand-offs cost more
    # than the arithmetic (30x on tiny matrices). The count is restored for the modules that follow.
    import torch  # only here: the tests that never touch torch do not load it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` (each test), or
# "one_torch_thread_per_module" (its module-scoped fixtures built on one thread as well).
one_torch_thread = pytest.fixture(_one_torch_thread, name="one_torch_thread")
one_torch_thread_per_module = pytest.fixture(_one_torch_thread, scope="module", name="one_torch_thread_per_module")

"""What users see of a job's failure (worker/tasks.py:error_text): `Type: message` without the server's
folders; the traceback goes to the worker's log (issue 18). No services needed."""
from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import pytest

from jobs.settings import reset_settings


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    folders = {"home": tmp_path / "home", "artifacts": tmp_path / "srv" / "artifacts", "data": tmp_path / "datasets"}
    monkeypatch.setenv("LOWRANK_HOME", str(folders["home"]))
    monkeypatch.setenv("LOWRANK_ARTIFACT_ROOT", str(folders["artifacts"]))
    monkeypatch.setenv("LOWRANK_DATA_ROOTS", f'["{folders["data"]}"]')
    reset_settings()
    yield folders
    reset_settings()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - returns whatever it raised, with its traceback
        return caught


def test_error_text_is_one_line_without_server_paths(server, caplog: pytest.LogCaptureFixture) -> None:
    from worker.tasks import error_text

    site = sysconfig.get_paths()["purelib"]
    exc = _raised(ValueError(f"{server['artifacts']}/uploads/abc.npz: cannot read weights; "
                             f"{server['data']}/imgs/cat.png: truncated; from {site}/numpy/lib/format.py; "
                             f"home {server['home']}/x"))
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        text = error_text(exc, "job-123")
    assert text == ("ValueError: <artifacts>/uploads/abc.npz: cannot read weights; <data root>/imgs/cat.png: "
                    "truncated; from <python>/numpy/lib/format.py; home <lowrank home>/x"), text
    # The log keeps everything: the job id, the traceback, the real paths.
    record = caplog.records[-1]
    assert "job job-123 failed: ValueError" in record.getMessage() and record.exc_info[1] is exc
    assert "Traceback" in caplog.text and str(server["artifacts"]) in caplog.text


def test_error_text_is_bounded_and_keeps_lookalike_paths(server) -> None:
    from worker.tasks import ERROR_TEXT_CHARS, error_text

    assert len(error_text(_raised(RuntimeError("x" * 10_000)))) <= ERROR_TEXT_CHARS + 4
    # A folder that merely starts like the artifact root is not the artifact root.
    other = f"{server['artifacts']}-old/file"
    assert error_text(_raised(OSError(other))) == f"OSError: {other}"

"""Forged pagination cursors (issue 18, defect 5) on a live API: a 422 naming `cursor`, never a 500.

The probe: base64 of ["0001-01-01T00:00:00+14:00", "00000000-..."] made Postgres's bind overflow
(year 0 in UTC), a non-UUID second item and other JSON types raised past the decoder. The property
test throws many malformed cursors (wrong JSON shapes and types, times at the ends of the calendar
with any offset, naive times, random bytes, random text) at /api/v1/jobs and /api/v1/sweeps.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.service

PATHS = ("/api/v1/jobs", "/api/v1/sweeps")
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


def b64(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


PROBES = {
    "year 1 at +14:00 (overflows in UTC)": b64(["0001-01-01T00:00:00+14:00", ZERO_UUID]),
    "year 9999 at -14:00": b64(["9999-12-31T23:59:59-14:00", ZERO_UUID]),
    "non-UUID id": b64(["2026-01-01T00:00:00+00:00", "not-a-uuid"]),
    "number id": b64(["2026-01-01T00:00:00+00:00", 123]),
    "number time": b64([123, ZERO_UUID]),
    "naive time": b64(["2026-01-01T00:00:00", ZERO_UUID]),
    "object": b64({"a": "2026-01-01T00:00:00+00:00", "b": ZERO_UUID}),
    "three items": b64(["2026-01-01T00:00:00+00:00", ZERO_UUID, "x"]),
    "null": b64(None),
    "nested": b64([["2026-01-01T00:00:00+00:00"], [ZERO_UUID]]),
    "deep nesting": base64.urlsafe_b64encode(b"[" * 370).decode(),
    "not base64": "%%%not*base64",
    "invalid UTF-8": base64.urlsafe_b64encode(b"\xff\xfe\x00[").decode(),
    "too long": "A" * 501,
}


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_cursors_are_422_naming_cursor(idle_client, name: str) -> None:
    for path in PATHS:
        r = idle_client.get(path, params={"cursor": PROBES[name]})
        assert r.status_code == 422, (path, name, r.status_code, r.text)
        assert r.json()["detail"][0]["loc"] == ["query", "cursor"], r.text


def test_a_real_cursor_still_pages(idle_client) -> None:
    for path in PATHS:
        r = idle_client.get(path, params={"cursor": b64(["2999-01-01T00:00:00+14:00", ZERO_UUID]), "limit": 1})
        assert r.status_code == 200 and "items" in r.json(), r.text


_OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
_TIMES = st.one_of(
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59),
                 timezones=st.one_of(st.none(), _OFFSETS)).map(dt.datetime.isoformat),
    st.text(max_size=40))
_IDS = st.one_of(st.uuids().map(str), st.text(max_size=40))
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=8)
_CURSORS = st.one_of(
    st.tuples(_TIMES, _IDS).map(list).map(b64),                     # the right shape, any values
    st.lists(st.one_of(_TIMES, _IDS, _JSON), max_size=4).map(b64),  # wrong lengths and types
    _JSON.map(b64),
    st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.text(max_size=120),
)


def test_malformed_cursors_never_500(idle_client) -> None:
    seen = {200: 0, 422: 0}

    @given(cursor=_CURSORS)
    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(cursor: str) -> None:
        for path in PATHS:
            r = idle_client.get(path, params={"cursor": cursor})
            assert r.status_code in (200, 422), (path, cursor, r.status_code, r.text)
            seen[r.status_code] += 1
            if r.status_code == 422:
                assert r.json()["detail"][0]["loc"] == ["query", "cursor"], (cursor, r.text)
            elif cursor:  # accepted: it must have been a well-formed [aware time, UUID]
                when, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
                assert dt.datetime.fromisoformat(when).tzinfo is not None and uuid.UUID(job_id)

    check()
    assert seen[422] > 300 and seen[200] > 0, seen  # both kinds were exercised

"""A latency job's `source` (a compress job whose per-layer ranks are measured) against what is stored.

At submit (`resolve_latency_source`, called by jobs.store.resolve_references before the spec is stored, and by
check_references inside the submitting transaction) the source is refused with InvalidInput naming the field
when it is no job, not a compress job, another user's (unless the caller is an admin), not succeeded, or factored
no layer; `model`, `num_classes`, `small_input` given in the spec must be the compressed model's. The spec then
takes the compressed model's architecture (model, classes, stem) and, unless it gives one, its calibration image
size, so the stored spec says what runs.

`source_ranks(result)` (the worker): the compress result's {layer: rank} of the layers it factored.
Torch-free: the API imports it.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from jobs import models as m
from jobs.errors import InvalidInput

__all__ = ["resolve_latency_source", "source_ranks"]


def _refuse(message: str, field: str = "source") -> InvalidInput:
    return InvalidInput(message, ("latency", field))


def source_ranks(result: dict[str, Any] | None) -> dict[str, int]:
    """{layer: rank} of the layers a compress job's result says it factored (in the model's order)."""
    return {row["layer"]: int(row["rank"]) for row in (result or {}).get("layers") or []
            if row.get("status") == "factored" and row.get("rank") is not None}


def resolve_latency_source(session: Session, spec: Any, *, owner: str | None = None,
                           admin: bool = True) -> dict[str, Any]:
    """The spec fields the source fixes ({model, num_classes, small_input, image_size}); InvalidInput (HTTP 422,
    naming the field) unless `spec.source` is a succeeded compress job of the caller that factored a layer."""
    row = session.get(m.Job, spec.source)
    if row is None:
        raise _refuse(f"source: no job with id {spec.source}")
    if row.kind != "compress":
        raise _refuse(f"source: job {row.id} is a {row.kind} job; a latency source is a succeeded compress job "
                      "(its per-layer ranks are measured)")
    if not admin and row.owner != owner:
        raise _refuse(f"source: job {row.id} belongs to another user; measure your own compress jobs (or ask its "
                      "owner or an admin)")
    if row.status != "succeeded":
        raise _refuse(f"source: job {row.id} is {row.status}; its ranks can be measured once it has succeeded")
    result = row.result or {}
    if not source_ranks(result) or result.get("model") is None:
        raise _refuse(f"source: compress job {row.id} factored no layer; there is nothing factored to measure")
    resolved = {"model": result["model"], "num_classes": result.get("num_classes"),
                "small_input": result.get("small_input")}
    for field, value in resolved.items():
        given = getattr(spec, field)
        if given is not None and value is not None and given != value:
            raise _refuse(f"{field}: compress job {row.id} compressed a model with {field} {value!r}, not {given!r}; "
                          f"leave {field} out (the source's is taken)", field)
    size = (result.get("data") or {}).get("image_size")
    resolved["image_size"] = spec.image_size or size
    return {k: v for k, v in resolved.items() if v is not None}

"""Dry runs: the flows' own code, run with every stage looked up instead of computed.

`finescope store plan` runs a flow's graph function (`flows.curate.curate_graph`,
`flows.specialize.specialize_graph`, ...) inside `planning(store)`. Stage tasks are then not Prefect
tasks: a `StageTask` called while planning builds its key as it would in a run and `run_cached`
records a row (`reuse` when the store holds the artifact, else `compute`) instead of building. What
a stage to compute would produce is a `Pending` value naming that stage; a stage (or a step between
stages) that receives one is planned `after` it, without reading anything. So the plan is the flow
itself, and a stage added to a flow is in the plan with nothing else to write.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar

from pydantic import BaseModel

from finescope_core.store import ArtifactStore

Status = Literal["reuse", "compute", "after"]
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class PlannedPart:
    """One piece of a fanned-out stage (an activation shard, the SAEs of some layers, a codes shard)."""

    stage: str
    key: str
    reused: bool


@dataclass
class PlannedStage:
    """One stage of the plan. `key` is None when an upstream stage (`after`) must be computed first."""

    name: str
    stage: str
    status: Status
    key: str | None = None
    uri: str | None = None
    after: str | None = None
    parts: list[PlannedPart] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        parts = (
            {"reused": sum(p.reused for p in self.parts), "total": len(self.parts)} if self.parts else None
        )
        return {
            "name": self.name,
            "stage": self.stage,
            "status": self.status,
            "key": self.key,
            "uri": self.uri,
            "after": self.after,
            "parts": parts,
        }


@dataclass
class Plan:
    flow: str
    store: str
    stages: list[PlannedStage]

    def counts(self) -> dict[str, int]:
        return {s: sum(row.status == s for row in self.stages) for s in ("reuse", "compute", "after")}

    def keys(self) -> set[tuple[str, str]]:
        """Every (stage, key) the run would read or write, fanned-out parts included: what `gc` keeps."""
        out = {(row.stage, row.key) for row in self.stages if row.key is not None}
        return out | {(p.stage, p.key) for row in self.stages for p in row.parts}

    def to_json(self) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "store": self.store,
            "counts": self.counts(),
            "stages": [s.to_json() for s in self.stages],
        }


class Pending:
    """What a dry run hands on for a value that only a stage to compute would produce.

    It stands in for any value: an attribute, an item or a call of it is the same pending value, so
    the flow's code between stages runs unchanged until a stage (or a `plannable` step) receives it.
    """

    def __init__(self, after: str):
        self.after = after
        """The plan row of the stage that must be computed first."""

    def __getattr__(self, name: str) -> Pending:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __getitem__(self, key: object) -> Pending:
        return self

    def __call__(self, *args: object, **kwargs: object) -> Pending:
        return self

    def __repr__(self) -> str:
        return f"Pending(after={self.after!r})"


class Planner:
    """The rows of one dry run, in the order the flow reaches its stages."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.rows: list[PlannedStage] = []
        self.label: str | None = None
        self._parts: list[PlannedPart] = []

    def part(self, stage: str, key: str, reused: bool) -> None:
        """A fanned-out part: listed under the next row (the stage that gathers it)."""
        self._parts.append(PlannedPart(stage, key, reused))

    def row(
        self, name: str, stage: str, status: Status, key: str | None = None, after: str | None = None
    ) -> None:
        uri = self.store.artifact_uri(stage, key) if key is not None else None
        if key is not None and any((r.name, r.stage, r.key) == (name, stage, key) for r in self.rows):
            return  # the same stage reached twice (the model a subflow resolved too): planned once
        parts, self._parts = self._parts, []
        self.rows.append(PlannedStage(name, stage, status, key, uri, after, parts))


_PLANNER: contextvars.ContextVar[Planner | None] = contextvars.ContextVar("finescope_planner", default=None)


def current_planner() -> Planner | None:
    """The dry run in progress in this context, if any."""
    return _PLANNER.get()


@contextlib.contextmanager
def planning(store: ArtifactStore) -> Iterator[Planner]:
    """Run the enclosed flow code as a dry run against `store`."""
    planner = Planner(store)
    token = _PLANNER.set(planner)
    try:
        yield planner
    finally:
        _PLANNER.reset(token)


@contextlib.contextmanager
def labelled(label: str | None) -> Iterator[None]:
    """The plan row name of the stage about to be looked up (`run_cached` reads it)."""
    planner = current_planner()
    if planner is None or label is None:
        yield
        return
    outer, planner.label = planner.label, label
    try:
        yield
    finally:
        planner.label = outer


def blocker(value: Any) -> str | None:
    """The stage a value waits for: the first `Pending` in it (lists, tuples, dicts and models searched)."""
    if isinstance(value, Pending):
        return value.after
    pending = getattr(value, "pending", None)  # PendingManifest / PendingModel
    if isinstance(pending, str):
        return pending
    items: Any = ()
    if isinstance(value, Mapping):
        items = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, BaseModel):
        items = (getattr(value, name) for name in type(value).model_fields)
    for item in items:
        found = blocker(item)
        if found is not None:
            return found
    return None


def first_blocker(*values: Any) -> str | None:
    return next((b for b in map(blocker, values) if b is not None), None)


def plannable(fn: Callable[P, R]) -> Callable[P, R]:
    """A step between stages (it reads artifacts): in a dry run, it waits for any pending argument."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if current_planner() is not None:
            waiting = first_blocker(args, kwargs)
            if waiting is not None:
                return Pending(waiting)  # type: ignore[return-value]  # consumers test with `blocker`
        return fn(*args, **kwargs)

    return wrapper

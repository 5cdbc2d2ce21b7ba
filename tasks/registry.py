"""The pipeline's stages, each declared once: name, upstream stages, key model, core entry, files.

A task module declares its stage with `@stage_task(Stage(...), label=..., **prefect_options)` on the
task function. The declaration registers the stage in `STAGES` and wraps the function in a Prefect
task and a `StageTask`, which the flows call like the task itself. `STAGES` is what the rest derives
from: `store plan` runs the flows' own graph functions as dry runs (`tasks.planning`), `store gc` keeps
what the plan lists, the key walk (`tests/flows/test_keys.py`) reads each stage's key model, and
`docs/architecture.md` lists them. Adding a stage is a core `run` entry, a declared task, and the
line of the flow that calls it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

from prefect import Task, task
from prefect.utilities.annotations import quote

from finescope_core.store import ArtifactStore
from tasks.caching import PendingManifest, StageManifest, artifact_dir
from tasks.keymodels import StageKeyModel
from tasks.planning import Pending, current_planner, first_blocker, labelled

P = ParamSpec("P")
R = TypeVar("R")
Label = str | Callable[[dict[str, Any]], str]
"""A plan row's name: a format string over the call's arguments, or a function of them."""


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the store, the plan and the docs know it."""

    name: str
    """The stage's name: its store directory (`<store>/<name>/<key>/`) and its plan rows' stage."""
    key: type[StageKeyModel] | None
    """Its cache key's model (the config fields it reads, its version, its code); None for a step
    that is no stage of its own (reading inputs, resolving a model)."""
    upstream: tuple[str, ...] = ()
    """The stages whose artifacts it reads."""
    core: Callable[..., Any] | None = None
    """The core entry that does its work (`run(inputs, section, ctx, work_dir, progress)`)."""
    files: tuple[str, ...] = ()
    """The files (or directories) its artifact holds, by the constants of its core module."""
    part_of: str | None = None
    """For a fanned-out part (an activation shard, some layers' SAEs): the stage that gathers it."""
    model_dir: str | None = None
    """The directory of its artifact that holds a loadable model (`pruned`, `tuned`), if any."""


STAGES: dict[str, Stage] = {}
"""Every declared stage by name, in declaration order."""


def declare(stage: Stage) -> Stage:
    """Register `stage`; a second, different declaration under the same name is a programming error."""
    known = STAGES.get(stage.name)
    if known is not None and known != stage:
        raise ValueError(f"stage {stage.name!r} is declared twice, differently: {known} and {stage}")
    STAGES[stage.name] = stage
    return stage


def model_path(store: ArtifactStore, manifest: StageManifest) -> Path:
    """The local directory of the model a `pruned` or `tuned` artifact holds (downloaded when remote).

    Read from the stage's declaration, so a consumer needs neither the producing stage's code (nor its
    code identity in its key) nor a copy of its directory name."""
    found = STAGES.get(manifest.stage)
    if found is None or found.model_dir is None:
        raise ValueError(f"{manifest.uri}: stage {manifest.stage!r} holds no model")
    return artifact_dir(store, manifest) / found.model_dir


class StageTask(Generic[P, R]):
    """A stage's Prefect task, called like one; in a dry run (`tasks.planning`) it plans instead.

    While planning, a call that receives a pending value (what a stage to compute would produce) is
    planned `after` that stage and returns a pending value itself; any other call runs the task's
    function directly, where `run_cached` records the stage as reused or to compute.
    """

    def __init__(
        self,
        prefect_task: Task[P, R],
        stage: Stage | None,
        label: Label | None,
        keyless: tuple[str, ...] = (),
    ):
        self.task = prefect_task
        self.stage = stage
        self.label = label
        self.keyless = keyless

    def __getattr__(self, name: str) -> Any:
        """Everything else is the Prefect task's (`retries`, `cache_policy`, `tags`, ...)."""
        if name == "task":  # not set yet (unpickling): no recursion through this method
            raise AttributeError(name)
        return getattr(self.task, name)

    @property
    def fn(self) -> Callable[P, R]:
        return self.task.fn

    @property
    def name(self) -> str:
        return self.task.name

    def with_options(self, **options: Any) -> StageTask[P, R]:
        return StageTask(self.task.with_options(**options), self.stage, self.label, self.keyless)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        planner = current_planner()
        if planner is None:
            return self.task(*args, **kwargs)  # type: ignore[no-any-return]  # typed P -> R
        args = tuple(_plain(a) for a in args)
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        name = self.row_name(args, kwargs)
        waiting = first_blocker(*self._keyed(args, kwargs))
        if waiting is not None:
            if self.stage is None:
                return Pending(waiting)  # type: ignore[return-value]  # consumers test it with `blocker`
            planner.row(name, self.stage.name, "after", after=waiting)
            # Every stage task returns a manifest.
            return PendingManifest.of(self.stage.name, waiting)  # type: ignore[return-value]
        with labelled(name):
            return self.fn(*args, **kwargs)

    def map(self, *args: Any, **kwargs: Any) -> Any:
        """`Task.map`; in a dry run, each mapped call planned in turn."""
        if current_planner() is None:
            return self.task.map(*args, **kwargs)
        return _PlannedMap([self(*call_args) for call_args in _mapped_calls(args)])

    def _keyed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The arguments the stage's key depends on: all but `keyless` ones."""
        if not self.keyless:
            return [args, kwargs]
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        return [v for k, v in bound.arguments.items() if k not in self.keyless]

    def row_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The plan row's name: `label` formatted with the call's arguments, else the stage's name."""
        if self.label is None:
            return self.stage.name if self.stage is not None else self.task.name
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        if callable(self.label):
            return self.label(bound.arguments)
        return self.label.format(**bound.arguments).strip()


def _plain(value: Any) -> Any:
    """An argument as the task's function receives it: Prefect's `quote` taken off."""
    return value.unquote() if isinstance(value, quote) else value


class _PlannedMap(list[Any]):
    """The results of a planned `map`, with the `PrefectFutureList` call the flows make on them."""

    def result(self) -> list[Any]:
        return list(self)


def _mapped_calls(args: Iterable[Any]) -> list[tuple[Any, ...]]:
    from prefect.utilities.annotations import unmapped

    args = list(args)
    lengths = {len(a) for a in args if not isinstance(a, unmapped)}
    if len(lengths) != 1:
        raise ValueError(f"mapped arguments of different lengths: {sorted(lengths)}")
    (n,) = lengths
    return [tuple(a.value if isinstance(a, unmapped) else a[i] for a in args) for i in range(n)]


def variant_label(name: str) -> Label:
    """Plan rows of a per-variant stage: `name` for the curated pipeline, `name (random)` for a baseline's
    (the task's `tag` argument names the variant)."""
    return lambda args: name if args["tag"] == "curated" else f"{name} ({args['tag']})"


def stage_task(
    stage: Stage | None = None, *, label: Label | None = None, keyless: tuple[str, ...] = (), **options: Any
) -> Callable[[Callable[P, R]], StageTask[P, R]]:
    """Declare `stage` (None: a step of a flow that is no stage) and make its function a Prefect task.

    A stage's Prefect task is named as the stage (`pruned`, `distilled`, ...), so the store, the plan
    and the Prefect UI say one name. `label` names the stage's plan row from the call's arguments
    (`variant_label`, or a format string such as `"evaluation ({name})"`); `keyless` names the
    parameters its key does not read (a dry run plans the stage even while they are still to compute);
    `options` are `prefect.task`'s (retries, cache policy, tags, ...).
    """
    if stage is not None:
        declare(stage)
        if options.setdefault("name", stage.name) != stage.name:  # one name for a stage and its task
            raise ValueError(
                f"the task of stage {stage.name!r} is named {options['name']!r}: leave `name` out"
            )

    def wrap(fn: Callable[P, R]) -> StageTask[P, R]:
        return StageTask(task(fn, **options), stage, label, keyless)

    return wrap

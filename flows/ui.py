"""What the Prefect UI shows of a run: flow runs named by run name and settings, tags shared by CLI and
deployment runs, and task inputs that the UI can list (plain data, never a subflow's result)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

from finescope_core.config import FinescopeConfig
from tasks.context import run_name

T = TypeVar("T")

TAG = "finescope"
"""The tag of every finescope run (the deployments carry it too)."""


def detached(result: T) -> T:
    """A subflow's result, unlinked from the subflow run: call it on the result as the subflow returns.

    Prefect links a subflow's return value and its direct fields to the subflow run by object id (plain
    strings and numbers too: a manifest's `stage` "sae" is the same interned string as `curate.method`),
    and records any such object found in a task's arguments as a `flow_run` input of that task run.
    Prefect's UI refuses those inputs: the flow run's task-run list comes out empty. Forgetting the
    links of subflow runs (task runs keep theirs) lets every task input be recorded as the plain data
    it is. This reads the run context's link table, internal to Prefect (checked against 3.8).
    """
    from prefect.client.schemas.objects import RunType
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None:
        links = ctx.run_results
        for obj_id in [k for k, (_, kind, _) in links.items() if kind == RunType.FLOW_RUN]:
            del links[obj_id]
    return result


def run_tags(cfg: FinescopeConfig) -> list[str]:
    """`finescope` and the run's name: the tags of a CLI run, as a served deployment's runs carry them."""
    return [TAG, run_name(cfg)]


def tagged(cfg: FinescopeConfig) -> contextlib.AbstractContextManager[set[str]]:
    """Inside a flow: its subflows and tasks carry `run_tags`. A deployment tags its flow runs only, and the
    flow run of a CLI run is tagged by the CLI; this reaches everything the run starts either way."""
    from prefect import tags

    return tags(*run_tags(cfg))


def label(cfg: FinescopeConfig, flow: str) -> str:
    """A flow run's name: the run name, the curation method and, for flows that prune, the ratio
    (`math-sae-r0.3`), so runs of one config with different settings tell apart in the UI."""
    parts = [run_name(cfg), cfg.curate.method]
    if flow in ("specialize", "prune"):
        parts.append(f"r{cfg.prune.ratio:g}")
    return "-".join(parts)


def namer(flow: str) -> Callable[[], str]:
    """The `flow_run_name` of a finescope flow: `label` of the run's `config` parameter.

    Prefect calls it without arguments inside the new flow run, whose `config` is a FinescopeConfig (a
    Python call) or its JSON form (a deployment run).
    """

    def name() -> str:
        from prefect.runtime import flow_run

        raw = flow_run.parameters.get("config")
        try:
            cfg = raw if isinstance(raw, FinescopeConfig) else FinescopeConfig.model_validate(raw)
        except ValueError:  # the flow refuses the config itself, with its own message; the name waits
            return flow
        return label(cfg, flow)

    return name

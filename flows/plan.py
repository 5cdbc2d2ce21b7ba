"""`finescope store plan`: which stages the next run of a config reuses and which it computes.

The plan is a dry run of the flow's own graph function (`curate_graph`, `prune_graph`,
`specialize_graph`) inside `tasks.planning.planning`: every stage builds its key exactly as in a
run and is looked up instead of computed, so the plan cannot drift from what a run does, and a
stage added to a flow is planned with nothing more to write. A key hashes the content of the
upstream artifacts, so once a stage has to be computed the keys below it are unknown: those stages
are planned as "after X". Planning reads and hashes input data and small artifacts (records, the
curated set); it loads no model and needs no Prefect server: no task or flow is run.
"""

from __future__ import annotations

from finescope_core.config import FinescopeConfig
from flows.curate import curate_graph, read_data
from flows.prune import prune_graph
from flows.specialize import specialize_graph
from tasks.context import RunContext
from tasks.planning import Plan, planning

FLOWS = ("specialize", "prune", "curate")


def plan(cfg: FinescopeConfig, flow: str = "specialize") -> Plan:
    """The plan of the next `flow` run of `cfg` against its store.

    Raises:
        ValueError: an unknown flow, or input data the run would refuse too (same checks, same messages).
    """
    if flow not in FLOWS:
        raise ValueError(f"flow {flow!r} cannot be planned; choose one of {', '.join(FLOWS)}")
    ctx = RunContext.of(cfg)
    with planning(ctx.store) as planner:
        if flow == "curate":
            curate_graph(cfg, ctx, *read_data(cfg))
        elif flow == "prune":
            prune_graph(cfg, ctx)
        else:
            specialize_graph(cfg, ctx)
    return Plan(flow, cfg.store, planner.rows)

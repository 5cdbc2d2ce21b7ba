"""Adding a stage takes three places (docs/architecture.md, "Adding a stage"): a core `run` entry, a
declared task, and the line of a flow's graph that calls it. A toy stage added that way runs in a flow,
is in the plan (to compute before the run, reused under the run's key after it) and in the keys walk."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prefect import flow
from test_keys import readers
from tiny_run import write_workspace

from finescope_core.config import FinescopeConfig, FinetuneConfig
from finescope_core.progress import Progress, no_progress
from finescope_core.stage import StageContext
from flows.curate import curate_graph, read_data
from tasks.caching import RUN_RESULTS, StageManifest, run_cached
from tasks.context import RunContext
from tasks.data import load_data
from tasks.keymodels import StageKeyModel
from tasks.keys import key_models
from tasks.planning import planning
from tasks.registry import STAGES, Stage, stage_task

TOY_FILE = "toy.txt"


# 1. The core entry: the stage's work, in the one stage shape.
@dataclass(frozen=True)
class ToyInputs:
    texts: list[str]


def toy_run(
    inputs: ToyInputs, section: FinetuneConfig, ctx: StageContext, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    longest = max(inputs.texts, key=len)
    (work_dir / TOY_FILE).write_text(f"{longest} x{section.rank} (seed {ctx.seed})")
    progress(1, 1)
    return {"chars": len(longest)}


class ToyKey(StageKeyModel):
    STAGE = "toy"
    VERSION = "1"
    CONFIG: ClassVar[dict[str, str]] = {"rank": "finetune.rank", "seed": "seed"}

    rank: int
    seed: int


@pytest.fixture
def toy() -> Iterator[Any]:
    """2. The declared task (declared for this test only: the registry is process-wide)."""

    @stage_task(
        Stage("toy", ToyKey, upstream=("corpus",), core=toy_run, files=(TOY_FILE,)), cache_policy=RUN_RESULTS
    )
    def toy_task(section: FinetuneConfig, ctx: RunContext, corpus: StageManifest) -> StageManifest:
        def build(work: Path) -> dict[str, Any]:
            inputs = ToyInputs(texts=load_data(ctx, corpus).texts)
            return toy_run(inputs, section, ctx.stage_context(), work, no_progress)

        key = ToyKey.of(ctx.settings(finetune=section), {"corpus": corpus.sha256}).spec()
        return run_cached(ctx.store, key, build)

    try:
        yield toy_task
    finally:
        STAGES.pop("toy")


def toy_graph(config: FinescopeConfig, ctx: RunContext, toy_task: Any) -> StageManifest:
    """3. The line of a flow's graph that calls it (here after the curate graph)."""
    curated = curate_graph(config, ctx, *read_data(config))
    return toy_task(config.finetune, ctx, curated.corpus)


def test_a_toy_stage_added_in_three_places_runs_is_planned_and_keyed(tmp_path: Path, toy: Any) -> None:
    root = write_workspace(tmp_path)
    cfg = FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(tmp_path / "store"),
        device="cpu",
        curate={"method": "random", "final_size": 12},
    )
    ctx = RunContext.of(cfg)

    with planning(ctx.store) as before:
        toy_graph(cfg, ctx, toy)
    rows = {row.name: row for row in before.rows}
    # A fresh store: the corpus is to compute, so the toy's key is not known yet.
    assert (rows["corpus"].status, rows["toy"].status, rows["toy"].after) == ("compute", "after", "corpus")

    run = flow(name="toy", validate_parameters=False)(lambda: toy_graph(cfg, ctx, toy))
    made = run()
    assert not made.cached and made.info["chars"] > 0
    assert (tmp_path / "store" / "toy" / made.key / TOY_FILE).read_text().endswith("x32 (seed 0)")

    with planning(ctx.store) as after:
        toy_graph(cfg, ctx, toy)
    assert {row.name: (row.status, row.key) for row in after.rows}["toy"] == ("reuse", made.key)

    # The keys walk: the toy's key model is among the stages' and reads finetune.rank (and no other field).
    assert (
        ToyKey in key_models() and "toy" in readers("finetune.rank") and "toy" not in readers("finetune.lr")
    )
    other = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"rank": 8})})
    with planning(ctx.store) as changed:
        toy_graph(other, RunContext.of(other), toy)
    toy_row = next(row for row in changed.rows if row.name == "toy")
    assert toy_row.status == "compute" and toy_row.key not in (None, made.key)
    assert all(row.status == "reuse" for row in changed.rows if row.name != "toy")

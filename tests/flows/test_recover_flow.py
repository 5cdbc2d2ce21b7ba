"""The `recovered` stage in a tiny specialize run: planned, run per variant on its own pool (never an
evaluation record), read by `tuned`, reused on a re-run; with `recover.tokens: 0` the graph is as before."""

import json

import pytest
import yaml
from tiny_run import config_file, write_workspace

from finescope_core.config import FinescopeConfig, RecoverConfig
from finescope_core.data import Record
from finescope_core.recover import PoolDraw
from flows.plan import plan
from flows.specialize import curated_training, evaluation_data, specialize_flow
from tasks.caching import artifact_dir
from tasks.context import RunContext
from tasks.recover import draw_for

RECOVER = {
    "tokens": 768,
    "max_length": 32,
    "batch_size": 2,
    "grad_accum": 2,
    "pool": 40,
    "general_share": 0.25,
}


def _config(root, tmp, **recover) -> FinescopeConfig:
    path = config_file(
        root,
        root / "store",
        tmp / "cfg.yaml",
        recover={**RECOVER, **recover},
        evaluate={"split_fraction": 0.2, "max_length": 32, "baselines": ["random"]},
    )
    return FinescopeConfig.model_validate(yaml.safe_load(path.read_text()))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("recover"), questions=40)
    cfg = _config(root, root)
    planned = plan(cfg)
    return cfg, planned, specialize_flow(cfg)


def _record(ctx: RunContext, manifest) -> dict:
    return json.loads((artifact_dir(ctx.store, manifest) / "_COMPLETE.json").read_text())


def test_the_plan_lists_the_stage_for_every_variant(ran):
    _, planned, _ = ran
    rows = {row.name: row for row in planned.stages if row.stage == "recovered"}
    assert set(rows) == {"recovered", "recovered (random)"}
    assert all(row.status in ("compute", "after") for row in rows.values())


def test_every_variant_recovers_on_its_own_pool_and_tuned_starts_from_it(ran):
    cfg, _, result = ran
    ctx = RunContext.of(cfg)
    held_out = set(result.curate.held_out.excluded)
    pools = {}
    for name, variant in result.variants.items():
        assert variant.recovered is not None and not variant.recovered.cached
        assert variant.recovered.info["tokens"] >= cfg.recover.tokens
        lines = (artifact_dir(ctx.store, variant.recovered) / "pool.jsonl").read_text().splitlines()
        pools[name] = [json.loads(line) for line in lines]
        assert _record(ctx, variant.tuned)["inputs"]["pruned"] == variant.recovered.sha256
    for name, rows in pools.items():
        ids = [r["id"] for r in rows]
        assert len(ids) == 40 and not held_out & set(ids), f"{name}: an evaluation record in the pool"
    assert sum(r["general"] for r in pools[""]) == 10 and not any(r["general"] for r in pools["random"])
    assert [r["id"] for r in pools[""]] != [r["id"] for r in pools["random"]]
    assert set(result.metrics["recovery"]) == {"curated", "random"}
    assert {"recovered", "recovered-random"} <= set(result.metrics["stage_seconds"])
    report = (artifact_dir(ctx.store, result.report) / "report.md").read_text()
    assert "## Recovery over the corpus" in report


def test_the_evaluation_counts_the_pools_as_learned(ran):
    cfg, _, result = ran
    ctx = RunContext.of(cfg)
    training = {"": curated_training(cfg, ctx, result.curate)}
    distilled = {"": result.variants[""].distilled}
    clean = evaluation_data(cfg, ctx, result.curate, training, distilled, {"": None})
    item = clean.domain[0]
    leaked = PoolDraw([Record(id="leak", text=item.text, fields={}, origin="x")], frozenset())
    checked = evaluation_data(cfg, ctx, result.curate, training, distilled, {"": leaked})
    assert item.id not in {i.id for i in checked.domain}
    assert len(checked.domain) == len(clean.domain) - 1


def test_a_rerun_reuses_it_and_tokens_zero_plans_the_graph_as_before(ran, tmp_path):
    cfg, _, result = ran
    again = specialize_flow(cfg)
    assert all(v.recovered is not None and v.recovered.cached for v in again.variants.values())
    assert all(row.status == "reuse" for row in plan(cfg).stages)
    off = cfg.model_copy(update={"recover": cfg.recover.model_copy(update={"tokens": 0})})
    rows = {row.name: row for row in plan(off).stages}
    assert not any(row.stage == "recovered" for row in rows.values())
    main = result.variants[""]
    # Everything but the tuning is reused under its old key; tuned reads the pruned model as before.
    assert rows["pruned"].key == main.pruned.key and rows["pruned"].status == "reuse"
    assert rows["distilled"].key == main.distilled.key and rows["distilled"].status == "reuse"
    assert rows["tuned"].status == "compute"


def test_an_empty_training_pool_is_refused_with_the_fix_before_any_model_load():
    with pytest.raises(ValueError, match="recover.tokens: 0"):
        draw_for(RecoverConfig(), [], {}, "", seed=0)

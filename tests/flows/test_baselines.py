"""The paper's comparison models (`evaluate.baselines`): `random` and `generic` prune and tune on their own
data, `base_tuned` tunes the unpruned base on the curated variant's distilled data; every model is scored on
the same items and paired against base in a Table 1 layout. A missing `generic_file` is refused first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from tiny_run import config_file, write_workspace
from transformers import AutoConfig, AutoModelForCausalLM

from finescope_core.config import FinescopeConfig, load_config
from finescope_core.distilled import DISTILLED_FILE
from finescope_core.evaluate import metrics_schema_errors
from finescope_core.io import read_jsonl
from flows.cli import main
from flows.plan import plan
from flows.specialize import SpecializeResult, specialize_flow
from tasks.caching import artifact_dir
from tasks.context import RunContext
from tasks.registry import model_path

BASELINES = ["random", "generic", "base_tuned"]
EVALUATE = {"split_fraction": 0.2, "max_length": 32}
FINETUNE = {"rank": 4, "alpha": 8, "epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 48}


def write_generic(path: Path) -> Path:
    """Generic instructions that share nothing with the corpus (ids `g<i>`)."""
    rows = [{"id": f"g{i}", "instruction": f"Name colour number {i}.", "output": "Blue."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FinescopeConfig, SpecializeResult]:
    root = write_workspace(tmp_path_factory.mktemp("baselines"))
    generic = write_generic(root / "generic.jsonl")
    path = config_file(
        root,
        root / "store",
        root / "cfg.yaml",
        # finetune.method left to auto: run.json says what it chose
        finetune=FINETUNE,
        evaluate={**EVALUATE, "baselines": BASELINES, "generic_file": str(generic)},
        output=str(root / "out"),
    )
    cfg = load_config(path)
    return cfg, specialize_flow(cfg)


def distilled_ids(cfg: FinescopeConfig, result: SpecializeResult, name: str) -> set[str]:
    store = RunContext.of(cfg).store
    return {
        r["id"] for r in read_jsonl(artifact_dir(store, result.variants[name].distilled) / DISTILLED_FILE)
    }


def test_each_baseline_runs_its_stages_on_its_own_data(run: tuple[FinescopeConfig, SpecializeResult]) -> None:
    cfg, result = run
    assert set(result.variants) == {"", "random", "generic", "base_tuned"}
    curated, random, generic = (distilled_ids(cfg, result, n) for n in ("", "random", "generic"))
    assert generic and all(i.startswith("g") for i in generic), "generic's records come from the file"
    assert random and not any(i.startswith("g") for i in random) and random != curated
    keys = {n: result.variants[n].pruned.key for n in ("", "random", "generic")}  # type: ignore[union-attr]
    assert len(set(keys.values())) == 3, "each pruned on its own texts"

    main, tuned_base = result.variants[""], result.variants["base_tuned"]
    assert tuned_base.pruned is None, "base_tuned has no prune stage"
    assert tuned_base.distilled.key == main.distilled.key, "tuned on the curated variant's distilled data"
    store = RunContext.of(cfg).store
    base_width = AutoConfig.from_pretrained(cfg.model).intermediate_size
    assert AutoConfig.from_pretrained(model_path(store, tuned_base.tuned)).intermediate_size == base_width
    assert AutoConfig.from_pretrained(model_path(store, main.tuned)).intermediate_size < base_width
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    tuned = AutoModelForCausalLM.from_pretrained(model_path(store, tuned_base.tuned))
    assert any((a != b).any() for a, b in zip(base.parameters(), tuned.parameters(), strict=True)), "tuned"


def test_every_model_is_scored_paired_against_base_and_tabled(
    run: tuple[FinescopeConfig, SpecializeResult],
) -> None:
    cfg, result = run
    metrics: dict[str, Any] = result.metrics
    assert metrics_schema_errors(metrics) == []
    rows = ["base", "tuned-base_tuned", "pruned", "tuned", "pruned-random", "tuned-random"]
    rows += ["pruned-generic", "tuned-generic"]
    assert set(metrics["models"]) == set(rows)
    n = {m["ci"]["perplexity"]["n"] for m in metrics["models"].values()}
    assert len(n) == 1, "every model scored on the same items"
    vs_base = {c["a"] for c in metrics["comparisons"] if c["b"] == "base"}
    assert vs_base == set(rows) - {"base"}
    report = (artifact_dir(RunContext.of(cfg).store, result.report) / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and " | yes | " in line + " "]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table] == rows[1:]
    assert "| base | no | no |" in report
    assert any(line.startswith("| tuned-generic | yes | yes | generic file |") for line in table)

    record = json.loads((Path(cfg.output or "") / "run.json").read_text())  # type: ignore[arg-type]
    assert record["finetune_method"]["requested"] == "auto"
    assert record["finetune_method"]["method"] == record["config"]["finetune"]["method"]
    assert "tuned-base_tuned" in record["stages"] and "pruned-base_tuned" not in record["stages"]


def test_store_plan_plans_the_baselines(run: tuple[FinescopeConfig, SpecializeResult]) -> None:
    cfg, _ = run
    rows = {s.name: s.status for s in plan(cfg).stages}
    for name in ("pruned (random)", "pruned (generic)", "tuned (generic)", "tuned (base_tuned)"):
        assert rows[name] == "reuse", name
    assert "pruned (base_tuned)" not in rows and "distilled (base_tuned)" not in rows


def test_generic_without_its_file_is_refused_before_any_model_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValidationError, match="evaluate.generic_file is not set"):
        FinescopeConfig(seeds=["s"], corpus=["c"], evaluate={"baselines": ["generic"]})
    root = write_workspace(tmp_path)
    loads: list[Any] = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    for evaluate, says in (
        ({"baselines": ["generic"]}, "evaluate.generic_file is not set"),
        ({"baselines": ["generic"], "generic_file": str(root / "missing.jsonl")}, "missing.jsonl"),
    ):
        path = config_file(root, root / "store", root / "cfg.yaml", evaluate={**EVALUATE, **evaluate})
        assert main(["run", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
        assert says in capsys.readouterr().err
    assert loads == [] and not (root / "store" / "pruned").exists()

"""End to end: `finescope run` on a tiny model: every stage, metrics schema, report, cache on re-run."""

import json

import pytest
from tiny_run import TINY_LORA
from transformers import AutoModelForCausalLM

from finescope_core.config import FinescopeConfig
from finescope_core.evaluate import metrics_schema_errors
from finescope_core.tiny import save_tiny
from flows.cli import main
from flows.specialize import specialize_flow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("specialize"))


def write_workspace(root):
    """A tiny qwen2 model, a corpus of 40 sums and 40 greetings, one sum as the seed."""
    save_tiny(root / "model", "qwen2", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256)
    rows = [
        {"id": f"q{i}", "instruction": f"What is {i} plus {i + 1}?", "output": f"{2 * i + 1}"}
        for i in range(40)
    ]
    rows += [
        {"id": f"c{i}", "instruction": f"Say hello to friend {i}.", "output": "Hello!"} for i in range(40)
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "seeds.jsonl").write_text(
        json.dumps({"instruction": "What is 100 plus 7?", "output": "107"}) + "\n"
    )
    return root


def config(root) -> FinescopeConfig:
    return FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        curate={
            "final_size": 30,
            "top_m": 30,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "sae": {"d_sae": 32, "steps": 20, "batch_size": 16},
        },
        prune={"ratio": 0.2, "max_length": 32},
        teacher={"max_new_tokens": 8, "batch_size": 8},
        finetune=TINY_LORA,
        evaluate={"split_fraction": 0.3, "max_length": 32, "baselines": ["random"]},
    )


def test_specialize_end_to_end_and_cached_rerun(workspace, tmp_path):
    cfg = config(workspace)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.model_dump_json())
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg_file), "--out", str(out)]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics_schema_errors(metrics) == []
    # Every domain item is a sum with its answer, but its chat prompt fills evaluate.max_length (32 bytes),
    # so no chat perplexity is scored and raw text is primary.
    assert "chat_perplexity" not in metrics["models"]["base"]
    assert metrics["primary"]["metric"] == "perplexity"
    assert metrics["primary"]["why"].startswith("none of the ")
    assert "\n## Primary metric\n" in (out / "report.md").read_text()
    assert set(metrics["models"]) == {"base", "pruned", "tuned", "pruned-random", "tuned-random"}
    assert metrics["models"]["pruned"]["parameters"] < metrics["models"]["base"]["parameters"]
    assert metrics["models"]["tuned"]["parameters"] == metrics["models"]["pruned"]["parameters"]
    report = (out / "report.md").read_text()
    for image in ("saliency.png", "sae.png", "retrieval.png", "parameters.png", "evaluation.png"):
        assert f"]({image})" in report and (out / image).stat().st_size > 0
    # paired comparisons on the same items: tuned vs every model, every other model vs base
    pairs = {(c["a"], c["b"]) for c in metrics["comparisons"]}
    assert pairs == {("tuned", n) for n in ("base", "pruned", "pruned-random", "tuned-random")} | {
        (n, "base") for n in ("tuned-random", "pruned", "pruned-random")
    }
    assert "Paired comparisons (same items, bootstrap over items)" in report
    assert "- tuned vs tuned-random — domain perplexity (raw text) ratio" in report
    tuned = AutoModelForCausalLM.from_pretrained(out / "tuned-model")
    assert sum(p.numel() for p in tuned.parameters()) == metrics["models"]["tuned"]["parameters"]
    assert (out / "tuned-adapter" / "adapter_config.json").is_file()

    again = specialize_flow(cfg)
    stages = [
        again.curate.curated,
        *(m for v in again.variants.values() for m in (v.pruned, v.distilled, v.tuned)),
        *again.evaluations.values(),
        again.report,
    ]
    assert all(m.cached for m in stages)
    assert again.metrics["models"] == metrics["models"]

"""End to end: `finescope prune` on a tiny saved model: ratio, reload with plain transformers, cache."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from finescope_core.config import FinescopeConfig
from finescope_core.tiny import save_tiny
from flows.cli import main
from flows.prune import prune_flow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    save_tiny(root / "model", "llama", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256)
    rows = [
        {"id": f"r{i}", "text": f"Sample number {i}: the quick brown fox {i % 7} jumps."} for i in range(60)
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "seeds.jsonl").write_text(json.dumps({"text": "The quick brown fox jumps over 3 dogs."}) + "\n")
    return root


def config(root, **prune) -> FinescopeConfig:
    return FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        curate={
            "final_size": 20,
            "top_m": 20,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "sae": {"d_sae": 32, "steps": 20, "batch_size": 16},
        },
        prune={"ratio": 0.2, "max_length": 32, **prune},
    )


def test_prune_flow_hits_ratio_and_reloads(workspace, tmp_path):
    cfg = config(workspace)
    result = prune_flow(cfg)
    info = result.pruned.info
    assert abs(info["achieved_ratio"] - 0.2) <= 0.02
    assert info["params_before"]["total"] - info["params_after"]["total"] > 0

    assert main(["prune", "--config", _write(cfg, tmp_path), "--out", str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "pruned-model")
    after = sum(p.numel() for p in model.parameters())
    assert after == info["params_after"]["total"]
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["stages"]["pruned"]["cached"] is True  # the CLI run reused the flow run's artifact


def test_random_pruning_data_differs_from_curated(workspace):
    curated = prune_flow(config(workspace))
    random = prune_flow(config(workspace, data="random"))
    assert curated.pruned.key != random.pruned.key


def test_unreachable_ratio_is_refused_before_any_work(workspace, tmp_path):
    cfg = config(workspace, ratio=0.95)
    cfg.store = str(tmp_path / "fresh-store")
    with pytest.raises(ValueError, match="ratio"):
        prune_flow(cfg)
    assert not any((tmp_path / "fresh-store").glob("*/*"))


def _write(cfg: FinescopeConfig, tmp_path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.model_dump_json())
    return str(path)

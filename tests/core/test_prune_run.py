"""The `pruned` stage entry `finescope_core.prune.run`: the same files, weights and info as the task's
old path (`prune_model` then `save_pruned` under `model/`, the plan's info fields)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from finescope_core.config import PruneConfig
from finescope_core.progress import Info
from finescope_core.prune import MODEL_DIR, PruneInputs, prune_model, run, save_pruned
from finescope_core.stage import StageContext
from finescope_core.tiny import byte_tokenizer, tiny_model

TEXTS = [
    "Janet has 16 eggs and eats 3 of them.",
    "2 + 2 = 4, and 3 * 3 = 9.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "How many bolts in total does it take?",
]
CTX = StageContext(device="cpu", dtype="float32", seed=0)
OLD_INFO = (
    "target_ratio",
    "achieved_ratio",
    "params_before",
    "params_after",
    "widths_before",
    "widths_after",
)
"""The keys `tasks/prune.py` kept in the stage info before `run`."""


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_run_writes_what_prune_model_and_save_pruned_wrote(tmp_path: Path) -> None:
    cfg = PruneConfig(ratio=0.25, batch_size=2, max_length=32)
    tok = byte_tokenizer()

    old_model = tiny_model("qwen2", heads=8, kv_heads=4, hidden=64)
    plan = prune_model(old_model, tok, TEXTS, cfg, rule=cfg.widths)
    old_dir = save_pruned(old_model, tok, plan, tmp_path / "old" / "model", dtype=torch.bfloat16)
    report = plan.to_dict()

    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int, /, **info: Info) -> None:
        seen.append((done, total))

    work = tmp_path / "new"
    work.mkdir()
    inputs = PruneInputs(
        model=tiny_model("qwen2", heads=8, kv_heads=4, hidden=64),
        tokenizer=tok,
        texts=TEXTS,
        dtype=torch.bfloat16,
    )
    info = run(inputs, cfg, CTX, work, progress)

    assert info == {k: report[k] for k in OLD_INFO}
    new_dir = work / MODEL_DIR
    assert _files(work) == [f"{MODEL_DIR}/{f}" for f in _files(old_dir)]
    assert json.loads((new_dir / "prune_report.json").read_text()) == report
    old_weights, new_weights = (
        load_file(old_dir / "model.safetensors"),
        load_file(new_dir / "model.safetensors"),
    )
    assert old_weights.keys() == new_weights.keys()
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    assert all(w.dtype == torch.bfloat16 for w in new_weights.values())
    assert seen and seen[-1][0] == seen[-1][1], "progress reaches its total"

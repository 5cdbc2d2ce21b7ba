"""The `tuned` stage entry `finescope_core.finetune.run`: the same files, weights and info as the task's
old path (`read_distilled` then `lora_finetune` into the work dir, the summary's info fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finescope_core.config import FinetuneConfig
from finescope_core.distilled import read_distilled
from finescope_core.finetune import ADAPTER_DIR, MERGED_DIR, SUMMARY_FILE, TuneInputs, lora_finetune, run
from finescope_core.progress import no_progress
from finescope_core.stage import StageContext
from finescope_core.tiny import byte_tokenizer, tiny_model
from tests.core.test_finetune import ROWS

OLD_INFO = (
    "method",
    "kd_weight",
    "temperature",
    "train_examples",
    "eval_examples",
    "steps",
    "eval_loss_before",
    "eval_loss",
    "best_epoch",
    "seconds",
    "tokens_per_second",
)
"""The keys `tasks/finetune.py` kept in the stage info before `run`."""
TIMED = {"seconds", "tokens_per_second"}
"""Wall-clock measures: the only info fields that differ between two identical runs."""


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _distilled(path: Path) -> Path:
    rows = [{"id": f"r{i}", "source": "curated", **row} for i, row in enumerate(ROWS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_run_writes_what_lora_finetune_wrote(tmp_path: Path, method: str) -> None:
    cfg = FinetuneConfig(
        rank=4,
        alpha=8,
        dropout=0.0,
        batch_size=2,
        grad_accum=1,
        max_length=128,
        epochs=2,
        eval_fraction=0.25,
        method=method,
        kd_weight=0.5 if method == "lora" else 0.0,
    )
    distilled = _distilled(tmp_path / "distilled.jsonl")
    teacher = tiny_model(seed=1) if cfg.kd_weight > 0 else None
    tok = byte_tokenizer()

    old_dir = tmp_path / "old"
    old_dir.mkdir()
    summary = lora_finetune(
        tiny_model(), tok, read_distilled(distilled), cfg, old_dir, seed=3, progress=None, teacher=teacher
    )
    old_info = summary.to_dict()

    work = tmp_path / "new"
    work.mkdir()
    inputs = TuneInputs(model=tiny_model(), tokenizer=tok, distilled=distilled, teacher=teacher)
    info = run(inputs, cfg, StageContext(device="cpu", dtype="float32", seed=3), work, no_progress)

    assert set(info) == set(OLD_INFO)
    assert {k: v for k, v in info.items() if k not in TIMED} == {
        k: old_info[k] for k in OLD_INFO if k not in TIMED
    }
    assert info["kd_weight"] == cfg.kd_weight and info["steps"] > 0
    assert _files(work) == _files(old_dir)
    assert (SUMMARY_FILE in _files(work)) and ((work / ADAPTER_DIR).exists() == (method == "lora"))
    old_weights = load_file(old_dir / MERGED_DIR / "model.safetensors")
    new_weights = load_file(work / MERGED_DIR / "model.safetensors")
    assert old_weights.keys() == new_weights.keys()
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)

"""Task of the `tuned` stage: LoRA on the pruned model with the distilled data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from finescope_core.config import FinescopeConfig
from finescope_core.distilled import read_distilled
from finescope_core.finetune import lora_finetune
from finescope_core.model import load_model
from tasks.common import (
    GPU_TAGS,
    RUN_RESULTS,
    STORE_RETRIES,
    ModelStageKey,
    Progress,
    StageKey,
    StageManifest,
    artifact_dir,
    open_store,
    run_cached,
)


class TunedKey(ModelStageKey):
    """`tuned`: every LoRA setting, on the pruned model and the distilled data."""

    STAGE = "tuned"
    VERSION = "1"
    CONFIG = {"finetune": "finetune", "seed": "seed"}

    finetune: dict[str, Any]
    seed: int


def tuned_key(cfg: FinescopeConfig, pruned_sha: str, distilled_sha: str) -> StageKey:
    return TunedKey.of(cfg, {"pruned": pruned_sha, "distilled": distilled_sha}).spec()


@task(name="finetune", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def finetune_task(cfg: FinescopeConfig, pruned: StageManifest, distilled: StageManifest, tag: str) -> StageManifest:
    """LoRA on the pruned model with the distilled data; adapter + merged model (plain HF directories)."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        model, tok = load_model(str(artifact_dir(store, pruned) / "model"), device=cfg.device, dtype=cfg.model_dtype)
        rows = read_distilled(artifact_dir(store, distilled) / "distilled.jsonl")
        summary = lora_finetune(model, tok, rows, cfg.finetune, work, seed=cfg.seed, progress=Progress(f"finetune ({tag})"))
        info = summary.to_dict()
        return {k: info[k] for k in ("train_examples", "eval_examples", "steps", "eval_loss_before", "eval_loss", "seconds", "tokens_per_second")}

    return run_cached(store, tuned_key(cfg, pruned.sha256, distilled.sha256), build)

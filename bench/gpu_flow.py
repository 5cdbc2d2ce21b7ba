"""The real `finescope run` on a saved random model, each stage's peak accelerator memory and time.

`bench/gpu_check.py --flow` calls `flow_check`: a Llama of the chosen shape with random weights is saved
to disk in the run's dtype (with an offline byte-level tokenizer), and the whole `specialize` flow runs on
it in this process, exactly as `finescope run` does (`flows.cli.main`), on a small corpus with no
baselines. Every stage the flow computes is measured where the flow hands it to the store: around the
stage's build in `run_cached` (`tasks.caching.build_releasing`), the CUDA allocator's peak is reset before
and read after, so each row is that stage's own peak (`torch.cuda.max_memory_allocated`), beside its wall
time and the memory planner's prediction for it (`finescope_core.memplan`). On a CPU the peak column is
empty: the script itself can be tried there with `--shape tiny --device cpu --dtype float32`.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_memory import write_data

import tasks.caching
from finescope_core.config import FinescopeConfig, load_config
from finescope_core.memplan import memory_plan
from finescope_core.tiny import byte_tokenizer

GIB = 2**30


def write_workspace(root: Path, model: torch.nn.Module, records: int) -> None:
    """The model directory (byte tokenizer: ids 0-2 are pad/bos/eos), a mixed corpus and four seeds."""
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.save_pretrained(root / "model", safe_serialization=True)  # type: ignore[operator]
    byte_tokenizer().save_pretrained(root / "model")
    write_data(root, records, words=12)


def run_config(root: Path, device: str, dtype: str) -> dict[str, Any]:
    """A small `specialize` run: every model stage once, no baselines, short sequences."""
    return {
        "model": str(root / "model"),
        "seeds": [str(root / "seeds.jsonl")],
        "corpus": [str(root / "corpus.jsonl")],
        "store": str(root / "store"),
        "device": device,
        "model_dtype": dtype,
        "orchestration": {"workers": 1},  # one stage at a time: its own peak
        "curate": {"final_size": 32, "top_m": 32, "reference_size": 16, "max_length": 128, "batch_size": 16},
        "prune": {"ratio": 0.3, "max_length": 128, "batch_size": 4},
        "teacher": {"max_new_tokens": 32, "batch_size": 16},
        "finetune": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "gradient_checkpointing": True},
        "evaluate": {
            "split_fraction": 0.2,
            "max_length": 160,
            "max_new_tokens": 16,
            "max_examples": 16,
            "domain_items": 16,
            "general_items": 16,
            "bootstrap_resamples": 200,
        },
    }


def measured_build(device: torch.device, rows: dict[str, dict[str, Any]]) -> Callable[..., Any]:
    """A stand-in for `build_releasing` that resets the allocator's peak before each stage's build and
    files the stage's own peak and wall time under its name (a stage built twice: its larger peak)."""
    real = tasks.caching.build_releasing

    def build(stage: str, fn: Callable[[Path], Any], work: Path) -> Any:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            return real(stage, fn, work)
        finally:
            peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
            row = rows.setdefault(stage, {"seconds": 0.0, "builds": 0, "peak_gib": peak})
            row["seconds"] = round(row["seconds"] + time.perf_counter() - start, 2)
            row["builds"] += 1
            if peak is not None:
                row["peak_gib"] = round(max(row["peak_gib"] or 0.0, peak), 2)

    return build


def flow_check(model: torch.nn.Module, device: torch.device, dtype: str, records: int) -> dict[str, Any]:
    """Run `finescope run` on `model` saved to a temporary directory; per-stage peaks, times, predictions."""
    from flows.cli import main as cli

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="finescope-gpu-flow-") as tmp:
        root = Path(tmp)
        write_workspace(root, model.to("cpu"), records)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (root / "run.yaml").write_text(json.dumps(run_config(root, device.type, dtype)))
        predicted = memory_plan(load_config(root / "run.yaml")).by_stage()
        original = tasks.caching.build_releasing
        tasks.caching.build_releasing = measured_build(device, rows)
        start = time.perf_counter()
        try:
            rc = cli(["run", "--config", str(root / "run.yaml"), "--out", str(root / "out")])
        finally:
            tasks.caching.build_releasing = original
        total = time.perf_counter() - start
        smoke = vllm_smoke(root / "model", dtype) if device.type == "cuda" else None
    for stage, row in rows.items():
        if stage in predicted:
            row["predicted_gib"] = round(predicted[stage] / GIB, 2)
        print(f"flow {stage:18s} " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"flow: exit status {rc}, {total:.0f} s in all", flush=True)
    if smoke is not None:
        print(f"vllm teacher: {smoke}", flush=True)
    return {"exit_status": rc, "seconds": round(total, 1), "stages": rows, "vllm": smoke}


def vllm_smoke(model_dir: Path, dtype: str, prompts: int = 64, new_tokens: int = 64) -> dict[str, Any] | None:
    """The vLLM teacher on the saved model with the engine settings a run gives it; None without vllm."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from finescope_core.memplan import vllm_engine_settings
    from finescope_core.teacher import VLLMGenerator

    cfg = FinescopeConfig(seeds=["s.jsonl"], corpus=["c.jsonl"])  # the default teacher and memory settings
    free, total = torch.cuda.mem_get_info()
    engine = vllm_engine_settings(cfg.teacher, cfg.memory_budget, new_tokens, free, total)
    start = time.perf_counter()
    teacher = VLLMGenerator(str(model_dir), dtype, 0, **engine)
    loaded = time.perf_counter() - start
    tok = byte_tokenizer()
    ids = [tok(f"Explain item {i}: the river and the road.")["input_ids"] for i in range(prompts)]
    start = time.perf_counter()
    out = teacher.generate(tok, ids, max_new_tokens=new_tokens, temperature=0.0, seed=0)
    seconds = time.perf_counter() - start
    made = sum(len(g.token_ids) for g in out)
    return {
        **engine,
        "start_seconds": round(loaded, 1),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(made / seconds),
    }

"""The SAE stages run on the run's device (`cfg.device`), not always on the CPU.

The tasks' device is checked on the meta device: `pick_device` is made to answer `meta`, and what
the task hands to training and encoding must be there."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import finescope_core.curate.sae as sae_stage
import finescope_core.sae.codes as codes_stage
import tasks.codes
import tasks.sae
from finescope_core.config import FinescopeConfig
from finescope_core.sae.model import BatchedSAE
from tasks.context import RunContext

META = torch.device("meta")


def _cfg() -> FinescopeConfig:
    return FinescopeConfig(seeds=["s"], corpus=["c"], device="cuda")


def _build_directly(tmp_path: Path) -> Any:
    """`run_cached` that just builds (the key and the store are not what is tested here)."""
    return lambda store, spec, build, **kw: build(tmp_path)


def test_sae_training_runs_on_cfg_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        tasks.sae, "pick_device", lambda device: META if device == "cuda" else torch.device(device)
    )
    monkeypatch.setattr(tasks.sae, "run_cached", _build_directly(tmp_path))
    monkeypatch.setattr(RunContext, "store", property(lambda self: None))
    monkeypatch.setattr(tasks.sae, "artifact_dir", lambda store, m: tmp_path)
    monkeypatch.setattr(tasks.sae, "activation_dirs", lambda store, acts: [tmp_path])
    monkeypatch.setattr(
        sae_stage.LayerSaliency, "load", lambda path: SimpleNamespace(indices=torch.zeros(2, 4))
    )
    monkeypatch.setattr(sae_stage, "sae_stage", lambda *a, **k: seen.update(k) or {})
    manifest = SimpleNamespace(sha256="x")
    cfg = _cfg()
    tasks.sae.sae_layers_task.fn(cfg.curate, RunContext.of(cfg), manifest, manifest, [0, 1], [0, 1])
    assert torch.device(seen.get("device")) == META


def test_sae_codes_are_encoded_on_cfg_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []
    found = SimpleNamespace(sha256="a")
    store = SimpleNamespace(lookup=lambda stage, key: found, local_path=lambda f: tmp_path)
    monkeypatch.setattr(
        tasks.codes, "pick_device", lambda device: META if device == "cuda" else torch.device(device)
    )
    monkeypatch.setattr(tasks.codes, "run_cached", _build_directly(tmp_path))
    monkeypatch.setattr(RunContext, "store", property(lambda self: store))
    monkeypatch.setattr(tasks.codes, "artifact_dir", lambda store, m: tmp_path)
    sae = BatchedSAE.initialised(4, 8, [0, 1])
    monkeypatch.setattr(codes_stage, "load_saes", lambda path: (sae, [0, 1], []))

    def write_codes(model: BatchedSAE, *a: Any, **k: Any) -> Any:
        seen.append(model.W_enc.device)
        return SimpleNamespace(num_rows=0, truncated=0, mean_l0=0.0)

    monkeypatch.setattr(codes_stage, "write_codes", write_codes)
    cfg = _cfg()
    tasks.codes.codes_task.fn(
        cfg.curate,
        RunContext.of(cfg),
        {"stage": "activation-shards", "key": "k", "sha256": "a"},
        SimpleNamespace(sha256="s"),
        0,
    )
    assert seen == [META]

"""finescope: a big general LLM -> a small domain-specialised one, from ~10 seeds and a corpus.

This package is the library: every stage as plain functions over typed inputs, with no orchestration
(the Prefect flows that chain and cache them live in `flows/`). The names below are its public API;
they are imported on first use, so `import finescope_core` stays cheap (no torch until needed).

    from finescope_core import load_config, load_records, load_model, compute_saliency

See docs/architecture.md for the stages and how they fit together.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("finescope")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_API: dict[str, str] = {
    # configuration and data
    "FinescopeConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "Record": "data",
    "RecordSet": "data",
    "DataError": "data",
    "load_records": "data",
    "deduplicate": "data",
    "ArtifactStore": "store",
    # models
    "load_model": "model",
    "resolve_arch": "model",
    "DecoderArch": "model",
    # curation: saliency -> activations -> SAEs -> retrieval and vote
    "compute_saliency": "saliency",
    "LayerSaliency": "saliency",
    "extract_pooled": "activations",
    "write_activation_shards": "activations",
    "load_activations": "activations",
    "BatchedSAE": "sae",
    "train_saes": "sae",
    "save_saes": "sae",
    "load_saes": "sae",
    "topm_max_over_seeds": "retrieval",
    "vote": "retrieval",
    "layer_weights": "retrieval",
    "hooked_layers": "curate",
    "select_records": "curate",
    # specialisation: pruning -> teacher -> LoRA -> evaluation
    "prune_model": "prune",
    "save_pruned": "prune",
    "plan_widths": "prune",
    "count_parameters": "prune",
    "generate_distilled": "teacher",
    "read_distilled": "distilled",
    "lora_finetune": "finetune",
    "evaluate_model": "evaluate",
    "perplexity": "evaluate",
    # outputs
    "model_card": "cards",
    "dataset_card": "cards",
    "write_report": "report",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'finescope_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"finescope_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""SAEs on disk: one directory per layer, `layer_{l:02d}/` with cfg.json, sae.safetensors, metrics.json.

One directory per layer (not one file for the batch) so that layers trained by different workers
can be gathered by copying directories, and any subset loaded and stacked again. Files are written
in place, not through temporary names: the curate stage saves into a store work dir, which the store
commits whole (`ArtifactStore.commit`), so no reader ever sees a half-written SAE.

cfg.json records the activation (`kind`, and `k` for TopK) from the SAE itself. SAEs saved before
TopK existed have no `kind`: they load as the ReLU SAEs they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from finescope_core.config import SAEConfig
from finescope_core.sae.metrics import LayerMetrics
from finescope_core.sae.model import BatchedSAE, SAEInputError

SAE_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
_TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "mean", "std")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Sorted keys and a fixed layout: the bytes (and so the artifact's hash) depend on the content only."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _per_layer_extras(
    extra_cfg: dict[str, Any] | Sequence[dict[str, Any]] | None, num_layers: int
) -> list[dict[str, Any]]:
    if extra_cfg is None:
        return [{} for _ in range(num_layers)]
    if isinstance(extra_cfg, dict):
        return [extra_cfg] * num_layers
    extras = list(extra_cfg)
    if len(extras) != num_layers:
        raise SAEInputError(
            f"extra_cfg has {len(extras)} entries for {num_layers} SAE layers; pass one per layer"
        )
    return extras


def save_saes(
    sae: BatchedSAE,
    metrics: Sequence[LayerMetrics],
    layers: Sequence[int],
    out_dir: Path,
    extra_cfg: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    cfg: SAEConfig | None = None,
) -> list[Path]:
    """Write one directory per layer, `out_dir/layer_{l:02d}/` with cfg.json, sae.safetensors, metrics.json.

    cfg.json goes last, so a directory with a cfg.json holds the other two; `load_saes` skips any
    without. Files are written in place (see the module docstring): save into a directory that is
    committed whole, like a store work dir.

    Args:
        sae: L-layer SAEs.
        metrics: one LayerMetrics per layer.
        layers: the model layer index of each SAE (names the directories).
        out_dir: parent directory (created if missing).
        extra_cfg: more JSON-serialisable cfg.json fields: one dict for every layer, or a list with
            one dict per layer (e.g. `{"coordinates": [...]}`, that layer's activation coordinates).
        cfg: the training config, whose fields are recorded in cfg.json.

    Returns:
        The layer directories, in order.
    """
    if not len(metrics) == len(layers) == sae.num_layers:
        raise SAEInputError(
            f"save_saes got {sae.num_layers} SAE layers, {len(metrics)} metrics and {len(layers)} layer ids; "
            "pass one metrics entry and one layer id per SAE layer"
        )
    if len(set(layers)) != len(layers):
        raise SAEInputError(
            f"save_saes got repeated layer ids {list(layers)}; each layer needs its own directory"
        )
    extras = _per_layer_extras(extra_cfg, sae.num_layers)
    # The SAE's own activation last: it is what `load_saes` rebuilds (k is null for a ReLU SAE).
    base = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **(cfg.model_dump() if cfg is not None else {}),
        "kind": sae.kind,
        "k": sae.k,
    }
    clash = sorted({key for extra in extras for key in extra} & (set(base) | {"layer"}))
    if clash:
        raise SAEInputError(f"extra_cfg keys {clash} would overwrite SAE fields; rename them")
    dirs = []
    for i, layer in enumerate(layers):
        layer_dir = Path(out_dir) / f"layer_{layer:02d}"
        layer_dir.mkdir(parents=True, exist_ok=True)
        one = sae.layer(i)
        tensors = {name: getattr(one, name).detach()[0].contiguous().cpu() for name in _TENSOR_NAMES}
        save_file(tensors, layer_dir / SAE_FILE)
        _write_json(layer_dir / METRICS_FILE, asdict(metrics[i]))
        _write_json(layer_dir / CFG_FILE, {**base, "layer": layer, **extras[i]})
        dirs.append(layer_dir)
    return dirs


def _load_layer(layer_dir: Path) -> tuple[BatchedSAE, dict[str, Any]]:
    cfg = json.loads((layer_dir / CFG_FILE).read_text())
    tensors = load_file(layer_dir / SAE_FILE)
    missing = sorted(set(_TENSOR_NAMES) - set(tensors))
    if missing:
        raise SAEInputError(f"{layer_dir / SAE_FILE} lacks tensors {missing}; re-run SAE training")
    # No `kind`: saved before TopK existed, so a ReLU SAE.
    sae = BatchedSAE(1, cfg["d_in"], cfg["d_sae"], cfg.get("kind", "relu"), cfg.get("k"))
    sae.load_state_dict({name: tensors[name][None] for name in _TENSOR_NAMES})
    return sae, cfg


def load_saes(out_dir: Path) -> tuple[BatchedSAE, list[int], list[dict[str, Any]]]:
    """Load every `layer_*/` SAE under out_dir (as written by `save_saes`), in layer order.

    Returns:
        The stacked SAEs (eval mode, CPU), their model layer indices, and their cfg.json contents.
    """
    layer_dirs = [p for p in Path(out_dir).glob("layer_*") if (p / CFG_FILE).is_file()]
    if not layer_dirs:
        raise SAEInputError(
            f"no SAE found under {out_dir} (expected layer_XX/{CFG_FILE}); train the SAEs first"
        )
    loaded = sorted((_load_layer(p) for p in layer_dirs), key=lambda item: item[1]["layer"])
    sae = BatchedSAE.stack([s for s, _ in loaded]).eval()
    cfgs = [c for _, c in loaded]
    return sae, [c["layer"] for c in cfgs], cfgs

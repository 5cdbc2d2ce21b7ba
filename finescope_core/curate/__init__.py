"""Curation stages over local directories: each reads its inputs, writes its outputs, returns a summary.

The Prefect tasks in `tasks/` are thin adapters around these modules (store look-up, cache key,
commit); anything that computes lives here or in the per-stage modules they call:

- `layers`: which decoder layers are hooked, the checks before any model work, the seeded row sample;
- `saliency`, `activations`, `sae`, `curated`: one stage each, with its `run` entry
  (`finescope_core.stage`) and its inputs;
- `embeddings`: what each method retrieves with (SAE codes, z-scored activations, sentence
  embeddings), in memory or shard by shard;
- `selection`: per-layer retrieval, layer weights, the vote, seed expansion and fusion;
- `curated_set`: the curated records and summary on disk, every record's score.
"""

from finescope_core.curate.activations import ActivationInputs, activation_stage
from finescope_core.curate.curated import CurateInputs
from finescope_core.curate.curated_set import (
    CURATED_FILE,
    CURATED_PARQUET,
    OUTPUT_FIELDS,
    SCORES_FILE,
    SUMMARY_FILE,
    curated_rows,
    load_scores,
    save_scores,
    write_curated,
)
from finescope_core.curate.embeddings import (
    Embeddings,
    ZScoredActivations,
    method_embeddings,
    raw_activation_embeddings,
    sae_codes,
    split_layers,
    streamed_embeddings,
)
from finescope_core.curate.layers import CurationError, check_curation_fits, hooked_layers, sample_rows
from finescope_core.curate.sae import SaeLayersInputs, sae_stage
from finescope_core.curate.saliency import SaliencyInputs, saliency_stage
from finescope_core.curate.selection import (
    Curation,
    curate_records,
    layer_vote_weights,
    quality_sample,
    seed_pooling,
    select_records,
)

__all__ = [
    "CURATED_FILE",
    "CURATED_PARQUET",
    "OUTPUT_FIELDS",
    "SCORES_FILE",
    "SUMMARY_FILE",
    "ActivationInputs",
    "CurateInputs",
    "Curation",
    "CurationError",
    "Embeddings",
    "SaeLayersInputs",
    "SaliencyInputs",
    "ZScoredActivations",
    "activation_stage",
    "check_curation_fits",
    "curate_records",
    "curated_rows",
    "hooked_layers",
    "layer_vote_weights",
    "load_scores",
    "method_embeddings",
    "quality_sample",
    "raw_activation_embeddings",
    "sae_codes",
    "sae_stage",
    "saliency_stage",
    "sample_rows",
    "save_scores",
    "seed_pooling",
    "select_records",
    "split_layers",
    "streamed_embeddings",
    "write_curated",
]

"""The `curate` section and its `curate.sae` sub-section: how the domain data is curated."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from finescope_core.config.base import PATH, Strict, one_or_many


class SAEConfig(Strict):
    """Sparse autoencoder training (paper eq. 3-5 and §6: FVU + alpha*AuxK + lambda*L1)."""

    kind: Literal["relu", "topk"] = "topk"
    """Activation of the codes. `topk` (default): the `k` largest ReLU pre-activations per sample, the
    rest zero (Gao et al. 2024, EleutherAI sparsify), so L0 is at most `k`, there is no L1 term and the
    stored codes are bounded (8 layers x k=32: about 1.1 KB a record); `relu`: ReLU codes with an L1
    penalty (the paper), so L0 follows from `l1_coef` (about 400 of 1024 on the demo: 13 KB a record).
    Retrieval encodes with the same activation."""
    k: int = Field(32, ge=1)
    """Latents kept per sample when `kind` is `topk` (at most `d_sae`); unused by `relu`."""
    d_sae: int = Field(1024, ge=8)
    """Latents per layer."""
    l1_coef: float = Field(3e-3, ge=0)
    """lambda: weight of the L1 penalty on the (post-ReLU) codes, per latent and sample; `relu` only."""
    aux_alpha: float = Field(1 / 32, ge=0)
    """alpha: weight of the AuxK loss that lets dead latents predict the residual."""
    k_aux: int = Field(256, ge=1)
    """Most dead latents used by AuxK per step."""
    dead_after: int = Field(2048, ge=1)
    """A latent is dead once it has not fired on this many consecutive training samples."""
    steps: int = Field(1500, ge=1)
    """Most optimiser steps (all layers train together, so this is also the per-layer count); early
    stopping (`patience`) can end a layer's training before."""
    batch_size: int = Field(256, ge=1)
    """Samples per step."""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate."""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the corpus activations held out (a seeded split, the same rows for every layer) to
    measure FVU, L0 and dead latents on data the SAE never trained on, and to stop early. 0: none
    (also when it would leave fewer than 2 rows on either side)."""
    eval_every: int = Field(50, ge=1)
    """Optimiser steps between evaluations on the held-out rows."""
    max_rows: int = Field(65536, ge=2)
    """Most corpus records the SAEs train on (a seeded sample, the same for every layer, when the
    corpus is larger); every record is encoded either way. Bounds the training's memory: at the
    default steps and batch size training sees about 6 passes over this many records."""
    patience: int = Field(5, ge=0)
    """Evaluations without a held-out FVU improvement (by 0.1% relative) after which a layer stops
    training; its weights are the ones with the best held-out FVU either way. 0: train all `steps`."""

    @model_validator(mode="after")
    def _k_fits(self) -> SAEConfig:
        if self.kind == "topk" and self.k > self.d_sae:
            raise ValueError(
                f"curate.sae.k={self.k} exceeds curate.sae.d_sae={self.d_sae}; keep at most d_sae latents"
            )
        return self


class CurateConfig(Strict):
    """Domain data curation: saliency -> activations -> SAEs -> retrieval -> layer vote."""

    method: Literal["sae", "sentence", "activation", "random"] = "sae"
    """How corpus records are scored against the seeds. `sae`: FineScope (SAE codes);
    `sentence`: all-MiniLM-L6-v2 embeddings; `activation`: the same pooled activations the SAEs
    read (saliency-selected coordinates, z-scored), without an SAE;
    `random`: a uniform sample. All write the same output format."""
    final_size: int = Field(100, ge=1)
    """Records in the curated set D_s."""
    top_m: int = Field(100, ge=1)
    """M of eq. 13: records each layer selects before the vote across layers."""
    layer_weighting: Literal["vote", "quality", "agreement"] = "vote"
    """How much each layer's top-M list counts in the vote. `vote`: every layer counts 1 (eq. 13), so
    a record's votes are the number of layers that chose it. `quality`: each layer counts by how far
    its embedding lifts a held-out seed above the corpus (leave-one-seed-out z-score, clipped at 0 and
    scaled to mean 1 over the layers; no labels), so a layer where the seeds look like any corpus
    record counts little or nothing. `agreement`: each layer counts by how much its top-M list overlaps
    the other layers' lists beyond chance (clipped at 0, scaled to mean 1; no labels, any number of
    seeds), on the view that layers agree on the domain and err independently. `quality` needs at
    least 2 seeds; `random` ignores this setting."""
    seed_pooling: Literal["softmax", "max", "mean"] = "softmax"
    """How a record's cosines to the seeds (in one layer's space) become its score. `max`: the
    nearest seed's cosine (eq. 12, the paper's rule); `mean`: the mean cosine over the seeds (a
    centroid: robust to one stray seed, weak on a domain made of several sub-topics); `softmax`:
    tau * log(mean_i exp(cos_i / tau)) with tau = `seed_temperature`, a smooth maximum between the
    two (tau -> 0: max; tau -> inf: mean), so a record close to several seeds outranks one that is
    close to a single seed, and a sub-topic with a few seeds still counts. Measured in
    bench/bench_curation.py (README, "Curation quality")."""
    seed_temperature: float = Field(0.2, gt=0)
    """tau of `seed_pooling: softmax`, in units of cosine similarity."""
    fusion: Literal["none", "sentence"] = "none"
    """`sentence`: fuse the method's ranking with the `sentence` baseline's by reciprocal rank
    (score = sum of 1 / (60 + rank) over the two rankings, each 2 x `final_size` deep); the output's
    `score` is then the fused score. Ignored by `sentence` and `random`."""
    expand_seeds: int = Field(0, ge=0)
    """Seed expansion: after a first retrieval, add its this many best records as pseudo-seeds
    (their codes, in every layer) and retrieve again. 0: off (the paper's single round)."""
    layers: list[int] | None = None
    """Decoder layers (0-based; negative counts from the end) to hook. None: `num_layers` evenly spaced."""
    num_layers: int = Field(8, ge=1)
    """How many layers to use when `layers` is None."""
    selector: Literal["jacobian", "magnitude", "variance"] = "jacobian"
    """Coordinate selector (Table 6): Jacobian saliency (eq. 6-10), mean |a|, or variance."""
    k_act: int = Field(128, ge=1)
    """K_act of eq. 10: coordinates kept per layer."""
    probes: int = Field(2, ge=1)
    """R of eq. 8: Rademacher probes per reference sample."""
    reference_size: int = Field(128, ge=1)
    """|D0|: corpus records (a seeded sample) that the saliency is averaged over."""
    max_length: int = Field(64, ge=4)
    """Tokens per record (longer texts are truncated)."""
    batch_size: int = Field(16, ge=1)
    """Records per forward pass."""
    skip_first: int = Field(1, ge=0)
    """Leading positions left out of pooling: the attention-sink token carries the model's
    massive activations and would otherwise dominate the mean."""
    shard_size: int = Field(4096, ge=1)
    """Records per corpus shard: one embedding task and one activation / code artifact each. Memory
    of every corpus-side stage is bounded by one shard (beyond the records themselves)."""
    code_k: Annotated[int, Field(ge=1)] | Literal["all"] = "all"
    """SAE latents stored per record and layer (`sae` method). `all`: every nonzero latent, so the
    stored codes are the codes (storage follows the SAEs' L0: with `sae.kind: topk`, `sae.k` latents,
    8 layers x (32 x 4 + 8) bytes, about 1.1 KB a record). A number keeps each code's largest that many, which
    bounds storage for ReLU SAEs but changes retrieval a little (measured in bench/bench_scale.py;
    `curation.json` gives the mean L0 and the share of codes truncated)."""
    code_dtype: Literal["float16", "float32"] = "float16"
    """Storage type of the stored code values (indices are 16-bit up to 32768 latents)."""
    sae: SAEConfig = Field(default_factory=SAEConfig)
    """SAE training settings."""
    sae_corpus: list[str] | None = Field(None, json_schema_extra=PATH)
    """Files/URIs of a general corpus (same formats as `corpus`) to train the SAEs on instead of the
    corpus being curated, as the paper trains on a general pre-training corpus: the SAEs then do not
    depend on what is curated, and one SAE set (cached by this corpus's hash) serves every corpus
    and seed set. Its activations use the same layers and saliency coordinates. None: train on the
    corpus being curated."""

    _sae_corpus_one_or_many = field_validator("sae_corpus", mode="before")(one_or_many)

    @field_validator("sae_corpus")
    @classmethod
    def _sae_corpus_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "give at least one file or URI, or leave it unset to train on the curated corpus"
            )
        return value

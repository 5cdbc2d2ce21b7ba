"""Typed configuration: one pydantic model per stage, composed into `FinescopeConfig`.

The CLI, the YAML file and the Prefect flow parameters all use these models. Every field's
docstring is its help text (`finescope curate --help` prints them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finescope_core.config_guard import check_no_credentials, redact_uri, safe_load

PATH: dict[str, Any] = {"path": "always"}
"""Field marker: a file/directory path; relative ones in a config file are resolved against its directory."""
NAME_OR_PATH: dict[str, Any] = {"path": "if-exists"}
"""Field marker: a keyword or hub id, or a local path (resolved against the config file's directory when
that path exists there)."""


def _one_or_many(cls: type, value: Any) -> Any:
    """A list-of-files field given one file as a plain string: that file alone."""
    return [value] if isinstance(value, str) else value


class _Strict(BaseModel):
    """Base: unknown fields are errors (a typo must not silently fall back to a default)."""

    # hide_input_in_errors: a refused value (a URI with credentials) must not be echoed into an error
    # message, which Prefect stores with the failed run.
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, hide_input_in_errors=True
    )


class StorageConfig(_Strict):
    """How to reach the artifact store when it is an object store (`s3://...`).

    Credentials never live in the config: a config is written into run.json, shell history (as a
    command-line option) and the Prefect database (as deployment parameters). They come from the
    standard AWS variables / profile, or from a Prefect Secret block named here.
    """

    endpoint_url: str | None = None
    """S3 endpoint (MinIO, Ceph, SeaweedFS...). None: AWS, or the AWS_ENDPOINT_URL variable."""
    region: str | None = None
    """Region name, if the endpoint needs one."""
    secret_block: str | None = None
    """Name of a Prefect Secret block whose value is `{"key": ACCESS_KEY_ID, "secret": SECRET_ACCESS_KEY}`.
    None: the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or profile."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        if isinstance(value, dict):
            given = [f"storage.{name}" for name in ("key", "secret") if name in value]
            if given:
                raise ValueError(
                    f"{' and '.join(given)}: credentials are not read from the config (it is saved in run.json, "
                    "shell history and the Prefect database); export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                    'or save a Prefect Secret block with {"key": ..., "secret": ...} and name it in '
                    "storage.secret_block"
                )
        return value

    def fsspec_options(self, credentials: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Options for `fsspec.filesystem('s3', **options)`.

        Args:
            credentials: `{"key", "secret"}` read from `secret_block` by the caller; None leaves them to
                the AWS variables / profile, which s3fs reads itself.
        """
        opts: dict[str, Any] = dict(credentials or {})
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        return opts


class SAEConfig(_Strict):
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


class CurateConfig(_Strict):
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

    _sae_corpus_one_or_many = field_validator("sae_corpus", mode="before")(_one_or_many)

    @field_validator("sae_corpus")
    @classmethod
    def _sae_corpus_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "give at least one file or URI, or leave it unset to train on the curated corpus"
            )
        return value


class PruneConfig(_Strict):
    """Structured pruning guided by the curated data (paper §3.2.1)."""

    ratio: float = Field(0.3, ge=0, lt=1)
    """Removed parameters / all parameters of the original model. The `prune` and `run` flows refuse 0:
    it would export the unpruned model as `pruned-model/`."""
    importance: Literal["taylor", "vector", "magnitude"] = "taylor"
    """Group importance: element-wise first-order Taylor |w*dL/dw| summed over the group (LLM-Pruner
    `element`), the `vector` variant |sum(w*dL/dw)|, or weight magnitude (no data)."""
    data: str = Field("curated", json_schema_extra=NAME_OR_PATH)
    """Pruning data: `curated` (D_s), `random` (a corpus sample of the same size), or a file/URI."""
    attention: Literal["heads", "kv_groups"] = "heads"
    """Attention unit: query heads (the same number per KV group) or whole KV groups."""
    widths: Literal["importance", "proportional"] = "importance"
    """How the common widths are chosen: among those within 2 points of the ratio, the one whose removed
    groups carry the least importance; or attention and MLP cut by the same fraction (LLM-Pruner)."""
    max_length: int = Field(128, ge=4)
    """Tokens per pruning sample."""
    batch_size: int = Field(4, ge=1)
    """Samples per backward pass."""


class TeacherConfig(_Strict):
    """Teacher-guided distillation data (paper §3.2.2, SDFT-style rewrite)."""

    model: str = Field("base", json_schema_extra=NAME_OR_PATH)
    """`base`: the unpruned base model; or any HF directory / hub id."""
    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers `generate`, batched by prompt length (any device). `vllm`: the vLLM engine
    (`pip install 'finescope[vllm]'`, CUDA only; continuous batching, raise `batch_size` to e.g. 256):
    the same prompts, budget, EOS tokens, output file and reject filter. Greedy outputs may differ
    from `hf` in the last float bits, so the choice is part of the distilled stage's key."""
    device_map: Literal["single", "auto"] = "single"
    """`hf` backend: `single` puts the teacher on `device`; `auto` lets accelerate spread its layers
    over every visible GPU (then the CPU), for a teacher larger than one GPU. The same outputs."""
    max_new_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Longest teacher response, in tokens. `auto`: 1.25 x the 95th percentile of the reference
    answers' token lengths, clamped to [32, 1024] (128 when no record has a reference); the value
    used is in the stage info (`max_new_tokens_used`)."""
    max_prompt_length: int = Field(384, ge=8)
    """Most prompt tokens. A rewrite prompt that is too long has its reference answer shortened
    first; when the request alone does not fit, the record keeps its reference (reason `prompt_too_long`)."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate() call (left padded)."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding (reproducible); above 0: sampling at this temperature."""
    min_response_chars: int = Field(8, ge=0)
    """Responses shorter than this are rejected (the reference is kept instead, when there is one)."""
    check_answer: bool = True
    """When a reference has a numeric final answer (GSM8K `#### 42`, `\\boxed{42}`, or a reference
    that ends with a number), reject a response whose final number differs (reason `wrong_answer`)."""


KD_WEIGHT = 0.5
"""Default `finetune.kd_weight` (bench/bench_recovery.py)."""
KD_TEMPERATURE = 1.0
"""Default `finetune.kd_temperature` (bench/bench_recovery.py)."""


class FinetuneConfig(_Strict):
    """LoRA recovery of the pruned model on the distilled data (paper §4: rank 32, AdamW, cutoff 256)."""

    RENAMED: ClassVar[dict[str, str]] = {"cutoff": "max_length", "temperature": "kd_temperature"}
    """Old field name -> its new name: the old one still loads, with a warning naming the new one."""

    rank: int = Field(32, ge=1)
    """LoRA rank r."""
    alpha: int = Field(64, ge=1)
    """LoRA alpha (scale = alpha / rank)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get adapters."""
    epochs: int = Field(2, ge=1)
    """Passes over the distilled data."""
    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate."""
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(2, ge=1)
    """Micro-batches per optimiser step."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (prompt + response), truncated beyond."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the distilled data held out for the per-epoch eval loss (and best-epoch selection)."""
    method: Literal["lora", "full"] = "lora"
    """`lora`: peft adapters on `target_modules` (outputs the adapter and the merged model); `full`:
    every weight of the pruned model (outputs the full model, no adapter)."""
    kd_weight: float = Field(KD_WEIGHT, ge=0, le=1)
    """w in `(1 - w) * CE + w * T^2 * KL(teacher || student)`: logit distillation from the teacher
    (`teacher.model`, the unpruned base model by default) on the response tokens; 0: cross entropy only."""
    kd_temperature: float = Field(KD_TEMPERATURE, gt=0)
    """T of the distillation term: both next-token distributions are softened by it."""
    kd_tokens: Literal["response", "all"] = "response"
    """Positions of the distillation term. `response`: the response tokens, like the cross entropy;
    `all`: every token of the formatted example, prompt included, so the pruned student also relearns
    the teacher's distributions over the domain's own text (each term is averaged over its own
    positions). Costs one log-softmax per position more; the teacher pass is the same."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the optimiser steps with a linear learning-rate warm-up (then cosine decay to 0)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    activation memory of one layer instead of all, for about a third more compute. The same updates
    (tested): for long `max_length`, large batches or full tuning of a big model on one GPU."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for old, new in cls.RENAMED.items():
                if old in value:
                    if new in value:
                        raise ValueError(
                            f"finetune.{old} and finetune.{new} are one setting: keep finetune.{new}"
                        )
                    logging.getLogger("finescope").warning(
                        "finetune.%s is now finetune.%s: rename it in the config", old, new
                    )
                    value = {**{k: v for k, v in value.items() if k != old}, new: value[old]}
        return value


class EvalConfig(_Strict):
    """Evaluation of base / pruned / tuned models (and the baselines) on one set of held-out items."""

    eval_file: str | None = Field(None, json_schema_extra=PATH)
    """File/URI of held-out domain items (any supported record format): the domain yardstick. Corpus
    records that duplicate one of its items leave the curation pool. None: the domain items are the
    `domain_items` evaluation-split records nearest the seeds' centroid."""
    split_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Share of the (de-duplicated) corpus set aside as the evaluation split before curation, by a
    seeded hash of each record's id (the same for every `curate.method`). The split never reaches
    curation, pruning, the teacher, tuning or the baselines."""
    split_max: int = Field(2000, ge=1)
    """Most records in the evaluation split (those with the lowest hash)."""
    domain_items: int = Field(100, ge=1)
    """Without `eval_file`: the split records nearest the seeds' centroid in all-MiniLM-L6-v2 space
    that are the domain evaluation items."""
    general_file: str | None = Field(None, json_schema_extra=PATH)
    """File/URI of general, out-of-domain texts (any supported format) for the specialisation trade-off.
    None: a seeded sample of the split records that are not domain items."""
    general_items: int = Field(200, ge=1)
    """Most general evaluation items (a seeded sample when there are more)."""
    bootstrap_resamples: int = Field(1000, ge=100)
    """Bootstrap resamples (over items, seeded) behind every metric's 95 % interval."""
    mc_file: str | None = Field(None, json_schema_extra=PATH)
    """Optional MMLU-style JSONL: {question, choices: [...], answer: index}; accuracy by log-likelihood."""
    numeric_file: str | None = Field(None, json_schema_extra=PATH)
    """Optional GSM8K-style JSONL: {question, answer} with a numeric final answer; exact match."""
    max_length: int = Field(256, ge=8)
    """Tokens per text for perplexity."""
    max_new_tokens: int = Field(256, ge=1)
    """Generation budget for numeric-answer questions."""
    max_examples: int = Field(200, ge=1)
    """At most this many examples per eval set (keeps CPU runs short)."""
    baselines: list[Literal["random", "corpus"]] = Field(default_factory=list)
    """Also prune+tune with random corpus data / the whole corpus at the same ratio (paper Tables 1-4)."""
    lm_eval_tasks: list[str] = Field(default_factory=list)
    """lm-evaluation-harness task names run on base / pruned / tuned (zero-shot, seeded); empty: none.
    They are looked up in `lm_eval_include`, or among lm-eval's stock tasks (which need the hub)."""
    lm_eval_include: str | None = Field(None, json_schema_extra=PATH)
    """Local directory of lm-eval task YAMLs (over local data files) defining `lm_eval_tasks`; only its
    tasks are visible when set. None: lm-eval's stock tasks."""
    lm_eval_limit: int | None = Field(None, ge=1)
    """At most this many examples per lm-eval task. None: `max_examples`."""
    lm_eval_chat_template: Literal["off", "on", "both"] = "off"
    """Run the lm-eval tasks with the tokenizer's chat template (lm-eval's `apply_chat_template`, the
    stock CLI's `--apply_chat_template`): each prompt becomes a user turn, the way an instruct model is
    used and the way finescope tunes it. `off`: plain prompts (the stock CLI's default); `on`: chat
    template only; `both`: each task twice, the chat-template run named `<task>@chat`."""


class OrchestrationConfig(_Strict):
    """How a run is spread over workers and where Prefect keeps its own results."""

    task_runner: Literal["threads", "dask", "ray"] = "threads"
    """Runner of the fanned-out stages (corpus shards, per-layer SAEs). `threads`: in this process;
    `dask`: a Dask cluster through prefect-dask; `ray`: a Ray cluster through prefect-ray
    (`pip install finescope[ray]`)."""
    address: str | None = None
    """Scheduler of an existing cluster (`tcp://host:8786` for Dask, `ray://host:10001` for Ray).
    None: start a local cluster for the run and stop it afterwards."""
    workers: int = Field(2, ge=1)
    """Threads (`threads`) or worker processes of the local cluster (`dask`, `ray`)."""
    gpu_concurrency: int | None = Field(None, ge=1)
    """At most this many tasks tagged `finescope-gpu` run at once, across every run on the Prefect
    server (a tag concurrency limit, set when the run starts). None: leave the server's limit as it is."""
    gpu_workers: bool = False
    """`dask` only: one worker per GPU. The GPU-tagged fanned-out tasks (embedding shards, SAE layer
    groups, code shards) ask for the Dask worker resource `GPU=1`, so they run only on workers that
    have it, one at a time each. A local cluster then starts one single-threaded worker per visible
    CUDA device (`workers` is ignored), each using its own device; on an existing cluster (`address`)
    start one worker per GPU with that resource, e.g. `CUDA_VISIBLE_DEVICES=0 dask worker ADDR
    --nthreads 1 --resources GPU=1` (the CUDA image does, see README)."""
    sae_layers_per_task: int = Field(1, ge=1)
    """Hooked layers trained together in one SAE task (one task per layer fans out the most; a
    larger value batches layers on one device). The SAEs are the same either way."""
    persist_results: bool = True
    """Persist Prefect task results as JSON in Prefect's local storage of the machine that runs the flow
    (never in the shared store: see README, security note), so the UI and reruns can read them back."""


class FinescopeConfig(_Strict):
    """A whole finescope run. A config of just `seeds` and `corpus` is enough."""

    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    """Name of this run's domain (lowercase letters, digits, dashes): it namespaces the Prefect artifact
    keys (`specialize-<name>-report`) and the default output directory. None: the config file's stem
    (CLI), the deployment's name (deployment runs), else `finescope`."""
    output: str | None = Field(None, json_schema_extra=PATH)
    """Directory or fsspec URI the run's outputs are exported to (run.json, models with cards, data,
    report). None: `<store>/outputs/<name>`. The CLI's `--out` sets it."""
    model: str = Field("default", json_schema_extra=NAME_OR_PATH)
    """`default` (the bundled SmolLM2-135M-Instruct), a local HF directory, or a hub id."""
    seeds: list[str] = Field(json_schema_extra=PATH)
    """Seed example files/URIs (JSONL, Parquet, .txt, HF save_to_disk dirs): ~10 in-domain records."""
    corpus: list[str] = Field(json_schema_extra=PATH)
    """Unlabeled corpus files/URIs to curate from."""
    store: str = Field("./finescope-store", json_schema_extra=PATH)
    """Artifact store: a local directory or an fsspec URI such as s3://bucket/prefix."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Credentials and endpoint for an object-store `store`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where model work runs. auto: cuda when available."""
    model_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Precision every model stage loads the base, teacher, pruned and tuned models in. auto: bfloat16 on
    a CUDA device that supports it, float32 otherwise (CPU). Saliency, pooled activations, importance
    scores and losses accumulate in float32 whatever this is; the pruned and tuned models are saved in
    the dtype of the base checkpoint."""
    memory_budget: float | None = Field(None, gt=0)
    """GB of memory the model stages may use. Preflight predicts each stage's peak from the model's
    config alone and refuses a run with a stage above it, before any model is loaded. Unset: the free
    memory of the CUDA device (on a CPU, no check)."""
    seed: int = 0
    """Random seed for every sampled choice (probes, D0, SAE init, random baseline)."""
    curate: CurateConfig = Field(default_factory=CurateConfig)
    """Curation stage."""
    prune: PruneConfig = Field(default_factory=PruneConfig)
    """Pruning stage."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """Teacher generation stage."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """LoRA distillation stage."""
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation stage."""
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    """Task runner, GPU concurrency and Prefect result storage."""

    _one_or_many = field_validator("seeds", "corpus", mode="before")(_one_or_many)

    @model_validator(mode="before")
    @classmethod
    def _no_uri_credentials(cls, value: Any) -> Any:
        # Also here, not only in load_config: a deployment's or a Python caller's parameters skip the loader.
        check_no_credentials(value)
        return value

    @field_validator("seeds", "corpus")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one file or URI")
        return value


class ConfigError(ValueError):
    """A configuration problem, with the file and field that caused it."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `finescope curate --help` lists the fields)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinescopeConfig:
    """Read a YAML config and apply dotted overrides (`{"curate.top_m": 50}`).

    Relative paths in the file (every field marked PATH / NAME_OR_PATH: data, store, output, models,
    evaluation files) are resolved against the file's directory; those in overrides are left relative
    to the working directory.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown field or out-of-range value, naming the field.
    """
    raw: dict[str, Any] = {}
    source = "command-line options"
    base_dir: Path | None = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
        try:
            loaded = safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of fields, got {type(loaded).__name__}")
        raw = loaded
        base_dir = p.resolve().parent
    if base_dir is not None:
        # Paths written in the file are relative to the file; paths given on the command line (applied
        # below) stay relative to the working directory.
        resolve_config_paths(raw, base_dir)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        check_no_credentials(raw)
    except ValueError as e:
        raise ConfigError(f"invalid configuration in {redact_uri(source)}: {e}") from None
    try:
        return FinescopeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def path_fields(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, str]:
    """Dotted name -> marker (`always` / `if-exists`) of every path field, recursing into sections."""
    model = model or FinescopeConfig
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(path_fields(ann, f"{prefix}{name}."))
        elif isinstance(info.json_schema_extra, dict) and "path" in info.json_schema_extra:
            out[f"{prefix}{name}"] = str(info.json_schema_extra["path"])
    return out


def resolve_config_paths(raw: dict[str, Any], base: Path) -> None:
    """Resolve, in place, every relative path field of a raw config mapping against `base`."""
    for dotted, how in path_fields().items():
        node: Any = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _resolve_paths(node[leaf], base, only_existing=how == "if-exists")


def _resolve_paths(value: Any, base: Path, *, only_existing: bool = False) -> Any:
    if isinstance(value, list):
        return [_resolve_paths(v, base, only_existing=only_existing) for v in value]
    if isinstance(value, str) and value and "://" not in value and not Path(value).expanduser().is_absolute():
        resolved = (base / Path(value).expanduser()).resolve()
        if not only_existing or resolved.exists():
            return str(resolved)
    return value


def slug(text: str) -> str | None:
    """`text` as a run name (lowercase letters, digits, dashes), or None when nothing is left of it."""
    out = "".join(c if c.isalnum() and c.isascii() else "-" for c in text.lower())
    out = "-".join(part for part in out.split("-") if part)[:63]
    return out or None

"""`FinescopeConfig`, a whole run's configuration: the general fields and one section per stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finescope_core.config.base import NAME_OR_PATH, PATH, Strict, one_or_many
from finescope_core.config.curate import CurateConfig
from finescope_core.config.evaluate import EvalConfig
from finescope_core.config.finetune import FinetuneConfig
from finescope_core.config.orchestration import OrchestrationConfig
from finescope_core.config.prune import PruneConfig
from finescope_core.config.recover import RecoverConfig
from finescope_core.config.storage import StorageConfig
from finescope_core.config.teacher import TeacherConfig
from finescope_core.config_guard import check_no_credentials


class FinescopeConfig(Strict):
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
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    """Recovery by logit distillation over the training pool (between pruning and tuning)."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """Teacher generation stage."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """LoRA distillation stage."""
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation stage."""
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    """Task runner, GPU concurrency and Prefect result storage."""

    _one_or_many = field_validator("seeds", "corpus", mode="before")(one_or_many)

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


def slug(text: str) -> str | None:
    """`text` as a run name (lowercase letters, digits, dashes), or None when nothing is left of it."""
    out = "".join(c if c.isalnum() and c.isascii() else "-" for c in text.lower())
    out = "-".join(part for part in out.split("-") if part)[:63]
    return out or None

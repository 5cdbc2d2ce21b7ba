"""The `evaluate` section: the held-out items every model is scored on, and the extra evaluations."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finescope_core.config.base import PATH, Strict


class EvalConfig(Strict):
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
    baselines: list[Literal["random", "corpus", "generic", "base_tuned"]] = Field(default_factory=list)
    """Comparison models, each scored on the same items (paper Table 1). `random`: pruned and tuned at the
    same ratio on a seeded sample of the training pool as large as the curated set; `corpus`: on the whole
    training pool (the paper's Full-OI); `generic`: on a seeded sample of `generic_file` as large as the
    curated set (the paper's Alpaca); `base_tuned`: the unpruned base model tuned on the curated variant's
    distilled data with the same recipe (no pruning: what tuning alone buys)."""
    generic_file: str | None = Field(None, json_schema_extra=PATH)
    """File/URI of generic instruction records (any supported record format, e.g. Alpaca JSONL) for the
    `generic` baseline; needed exactly when `baselines` lists `generic`."""
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

    @model_validator(mode="after")
    def _generic_needs_its_file(self) -> EvalConfig:
        if "generic" in self.baselines and self.generic_file is None:
            raise ValueError(
                "evaluate.baselines lists generic but evaluate.generic_file is not set: name a file of "
                "generic instruction records (e.g. Alpaca JSONL) in evaluate.generic_file, or drop generic"
            )
        return self

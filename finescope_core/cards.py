"""Hugging Face model and dataset cards (README.md with YAML metadata) for a run's outputs.

A directory pushed to a hub as it is shows its README.md as the model's or dataset's page, and the
hub reads the YAML block for search, the base-model tree and the evaluation table. Everything here
takes plain facts (run name, parameter counts, metrics.json) and returns the card's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the bundled default model (shipped as a GGUF file and de-quantised locally)."""
METRIC_TYPES = {"perplexity": "perplexity", "mc_accuracy": "accuracy", "numeric_exact_match": "exact_match"}
"""metrics.json keys reported in a model card's evaluation results, and the hub's metric type of each."""


@dataclass(frozen=True)
class RunFacts:
    """What a card says about the run that produced an output."""

    name: str
    """The run's name (`config.name`): the domain."""
    base_model: str
    """The model the run started from, as configured (`default`, a directory, a hub id)."""
    base_model_id: str | None
    """Its hub id when it has one (metadata `base_model`); None for a local model."""
    method: str
    """Curation method (`sae`, `sentence`, ...)."""
    code_version: str
    curated_records: int = 0
    prune: Mapping[str, Any] = field(default_factory=dict)
    """The prune stage's info: params_before / params_after / achieved_ratio / target_ratio."""
    metrics: Mapping[str, Any] | None = None
    """metrics.json (`{"models": {name: {...}}}`), when the run evaluated."""
    extra_tags: Sequence[str] = ()
    tuning: str = "lora"
    """How the tuned model was trained (`finetune.method`): `lora` (adapter merged in) or `full`."""


def base_model_id(spec: str, is_local_dir: bool) -> str | None:
    """The hub id of a configured model, or None when it names a local directory."""
    if spec == "default":
        return DEFAULT_BASE_HUB_ID
    return None if is_local_dir or spec.count("/") != 1 else spec


def _eval_results(facts: RunFacts, model_key: str) -> list[EvalResult]:
    entry = (facts.metrics or {}).get("models", {}).get(model_key) or {}
    out = []
    for key, metric_type in METRIC_TYPES.items():
        if isinstance(entry.get(key), int | float):
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=f"finescope/{facts.name}-eval",
                    dataset_name=f"{facts.name} held-out evaluation set",
                    metric_type=metric_type,
                    metric_name=key,
                    metric_value=round(float(entry[key]), 4),
                )
            )
    return out


def _metrics_table(facts: RunFacts) -> str:
    models = (facts.metrics or {}).get("models") or {}
    if not models:
        return "Not evaluated in this run."
    keys = [k for k in ("perplexity", *METRIC_TYPES) if any(k in m for m in models.values())]
    keys = list(dict.fromkeys([*keys, "parameters"]))
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, m in models.items():
        cells = [
            f"{m[k]:,}"
            if isinstance(m.get(k), int)
            else f"{m[k]:.4g}"
            if isinstance(m.get(k), float)
            else "–"
            for k in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = next(iter(models.values())).get("n", {})
    if n:
        lines += ["", "Examples per metric: " + ", ".join(f"{k} {v}" for k, v in n.items()) + "."]
    return "\n".join(lines)


def _pruning_line(facts: RunFacts) -> str:
    p = facts.prune
    if not p:
        return ""
    before, after = p["params_before"]["total"], p["params_after"]["total"]
    return (
        f"Structured pruning removed {before - after:,} of {before:,} parameters (ratio "
        f"{p['achieved_ratio']:.4f}, target {p['target_ratio']}): attention heads and MLP channels, the same "
        "widths in every layer, so the model loads with plain `AutoModelForCausalLM`."
    )


def _load_snippet(kind: Literal["pruned", "tuned", "adapter"]) -> str:
    if kind == "adapter":
        load = (
            'base = AutoModelForCausalLM.from_pretrained("pruned-model")\n'
            'model = PeftModel.from_pretrained(base, "tuned-adapter")\n'
            'tok = AutoTokenizer.from_pretrained("pruned-model")'
        )
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer"
    else:
        folder = f"{kind}-model"
        load = (
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
            f'tok = AutoTokenizer.from_pretrained("{folder}")'
        )
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    return (
        f"```python\n{imports}\n\n{load}\n"
        'messages = [{"role": "user", "content": "Your question"}]\n'
        "inputs = tok.apply_chat_template("
        'messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)\n'
        "out = model.generate(**inputs, max_new_tokens=128, do_sample=False)\n"
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n```'
    )


def model_card(kind: Literal["pruned", "tuned", "adapter"], facts: RunFacts) -> str:
    """README.md of `pruned-model/`, `tuned-model/` (LoRA merged in, or fully tuned) or `tuned-adapter/`
    (peft)."""
    what = {
        "pruned": (
            "the base model after structured pruning guided by the curated domain data, before recovery"
        ),
        "tuned": "the pruned model after teacher-guided LoRA distillation, with the adapter merged in"
        if facts.tuning == "lora"
        else "the pruned model after teacher-guided distillation, all of its weights tuned",
        "adapter": "the LoRA adapter of the tuned model; it applies to `pruned-model/` of the same run",
    }[kind]
    data = ModelCardData(
        base_model=facts.base_model_id,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        model_name=f"{facts.name}-{kind}",
        tags=[
            "finescope",
            "structured-pruning",
            *(
                ["distillation", *(["lora"] if facts.tuning == "lora" or kind == "adapter" else [])]
                if kind != "pruned"
                else []
            ),
            *facts.extra_tags,
        ],
        eval_results=_eval_results(facts, "pruned" if kind == "pruned" else "tuned") or None,
    )
    body = [
        f"# {facts.name}: {kind}",
        "",
        f"This is {what}. It was made by [finescope](https://arxiv.org/abs/2505.00624) {facts.code_version} "
        f"from `{facts.base_model}` for the `{facts.name}` domain: `{facts.method}` curation chose "
        f"{facts.curated_records} domain records out of the corpus, starting from a handful of seed "
        "examples.",
        "",
        _pruning_line(facts),
        "",
        "## Evaluation",
        "",
        "Measured by the run on held-out evaluation data (see `metrics.json` and `report.md` "
        "of the run when they were exported with it).",
        "",
        _metrics_table(facts),
        "",
        "## Use",
        "",
        _load_snippet(kind),
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content)


def _size_category(n: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return label
    return "n>1M"


def dataset_card(
    kind: Literal["curated", "distilled"],
    facts: RunFacts,
    records: int,
    data_files: Sequence[str],
    fields: Sequence[str],
) -> str:
    """README.md of the curated set (records chosen from the corpus) or the distilled set (teacher
    responses)."""
    data = DatasetCardData(
        pretty_name=f"{facts.name} ({kind})",
        size_categories=_size_category(records),
        task_categories=["text-generation"],
        tags=["finescope", kind],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": list(data_files)}]}],
    )
    what = (
        f"the `{facts.name}` domain records that `{facts.method}` curation chose out of the corpus, ranked "
        "(`rank`, `score`, `votes`; `layers` for the SAE layers that chose each), every original field kept"
        if kind == "curated"
        else f"the teacher-guided training data of the `{facts.name}` model: each curated training record's "
        "`prompt` and `response`, which is the teacher's (`source: teacher`) or, when the filter "
        "`rejected` the teacher's for the reason given, the record's reference answer (`source: reference`); "
        "a plain-text record's own `text` (`source: text`), learned as text"
    )
    body = [
        f"# {facts.name}: {kind} data",
        "",
        f"{records:,} records: {what}. Made by finescope {facts.code_version} with `{facts.base_model}`.",
        "",
        f"Fields: {', '.join(f'`{f}`' for f in fields)}.",
        "",
        "```python\nfrom datasets import load_dataset\n\n"
        f'ds = load_dataset("json", data_files="{data_files[0]}", split="train")\n```',
        "",
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content)

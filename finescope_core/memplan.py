"""Each model stage's peak memory, predicted from the model's config alone, and the budget check.

The parameter counts come from the model built on the meta device (`accelerate.init_empty_weights`:
shapes, no weights), so any architecture transformers builds is counted exactly; the activation and
cache terms use its config's widths. A stage's peak is what it adds above the process's memory before
any model is loaded: weights, gradients, optimiser states, activations, KV cache, and the teacher in
distillation. The weights term carries `LOAD_OVERHEAD` for what loading and the framework keep beside
the tensors (measured with `bench/bench_memory.py` on a CPU: the process's resident set over the
weights' bytes while a model is held). On a CPU run, a checkpoint stored in a wider dtype than the run's
is held whole beside the converted weights while it loads (`StagePeak.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PretrainedConfig

from finescope_core.config import FinescopeConfig, FinetuneConfig, TeacherConfig
from finescope_core.memory import OOM_FIXES
from finescope_core.model import model_config
from finescope_core.prune.chunks import layer_chunks, sums_limit

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOAD_OVERHEAD = 0.10
"""Share of a loaded model's bytes the process holds beyond its tensors (allocator slack, buffers)."""
ADAM_STATES = 2
"""AdamW keeps two float32 moments per trained parameter."""
GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """What the estimates need from a model's config, with its exact parameter counts."""

    params: int
    projection_params: int
    largest_param: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shapes:
        with init_empty_weights():
            # untyped in transformers
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        named = dict(model.named_parameters())
        proj = sum(
            p.numel() for n, p in named.items() if n.endswith("_proj.weight") or n.endswith("_proj.bias")
        )
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(
            params=sum(p.numel() for p in named.values()),
            projection_params=proj,
            largest_param=max(p.numel() for p in named.values()),
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            kv_width=kv_heads * head_dim,
            vocab=int(config.vocab_size),
        )

    def train_activations(self, tokens: int, elem: int, checkpointing: bool = False) -> int:
        """Bytes autograd keeps for one forward pass over `tokens` tokens: every layer's saved
        tensors (norm inputs, q/k/v, attention output, MLP gate/up/product), or with checkpointing
        each layer's input plus one layer's saved tensors; and the float32 logits and their gradient."""
        per_layer = 8 * self.hidden + 2 * self.kv_width + 4 * self.intermediate
        kept = self.layers * self.hidden + per_layer if checkpointing else self.layers * per_layer
        return tokens * (kept * elem + 3 * self.vocab * 4)

    def inference_activations(self, tokens: int, elem: int, on_cpu: bool = False) -> int:
        """Bytes a no-grad forward pass holds at once: a layer's widest tensors and the float32 logits.
        On a CPU they are counted in float32 whatever the weights' dtype: measured with
        `bench/bench_memory.py`, a bf16 evaluation holds as much above its weights as a float32 one."""
        act = 4 if on_cpu else elem
        return tokens * ((4 * self.hidden + 3 * self.intermediate) * act + 2 * self.vocab * 4)

    def kv_cache(self, tokens: int, elem: int) -> int:
        return 2 * self.layers * self.kv_width * tokens * elem


@dataclass(frozen=True)
class StagePeak:
    """One stage's predicted peak (bytes above the memory before any model load) and its parts.

    `loading` is what the stage holds only while it loads its models (a checkpoint read in a wider
    dtype than the run's, in host memory), beside the weights loaded before it, not beside the rest."""

    name: str
    parts: dict[str, int]
    loading: int = 0

    @property
    def peak(self) -> int:
        loaded = self.parts.get("weights", 0) + self.parts.get("teacher", 0)
        return max(sum(self.parts.values()), loaded + self.loading)


@dataclass(frozen=True)
class MemoryPlan:
    stages: tuple[StagePeak, ...]
    model_bytes: int
    budget: int | None = None
    notes: tuple[str, ...] = field(default=())

    def by_stage(self) -> dict[str, int]:
        """Predicted peak by store stage name (an activation shard's stage included)."""
        peaks = {s.name: s.peak for s in self.stages}
        if "activations" in peaks:
            peaks["activation-shards"] = peaks["activations"]
        return peaks

    def refusal(self) -> str | None:
        """Why the run cannot start within the budget (the first stage over it), or None."""
        if self.budget is None:
            return None
        for s in self.stages:
            if s.peak > self.budget:
                parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in s.parts.items() if v)
                fixes = "; ".join(f"({i}) {fix}" for i, fix in enumerate(OOM_FIXES, start=1))
                return (
                    f"stage {s.name!r} needs about {s.peak / GB:.2f} GB ({parts} GB) but the memory budget "
                    f"is {self.budget / GB:.2f} GB (memory_budget). Fixes, in order: {fixes}; "
                    "or raise memory_budget if the device has more free memory"
                )
        return None


class MemoryBudgetError(ValueError):
    """A stage's predicted peak is above the memory budget: refused before any model is loaded."""


def check_memory(cfg: FinescopeConfig, stages: tuple[str, ...] | None = None) -> MemoryPlan:
    """The run's memory plan (`stages`: only those of this flow); refuses it when a stage will not fit.

    Raises:
        MemoryBudgetError: naming the stage, its predicted need, the budget and the fixes in order.
    """
    plan = memory_plan(cfg)
    if stages is not None:
        plan = MemoryPlan(tuple(s for s in plan.stages if s.name in stages), plan.model_bytes, plan.budget)
    reason = plan.refusal()
    if reason is not None:
        raise MemoryBudgetError(reason)
    return plan


def memory_plan(cfg: FinescopeConfig) -> MemoryPlan:
    """`plan_memory` for the run's model (and its own teacher, when `teacher.model` names one) and budget."""
    teacher = None if cfg.teacher.model == "base" else model_config(cfg.teacher.model)
    return plan_memory(cfg, model_config(cfg.model), memory_budget(cfg), teacher=teacher)


def memory_budget(cfg: FinescopeConfig) -> int | None:
    """Bytes the model stages may use: `memory_budget`, else the CUDA device's free memory, else None."""
    if cfg.memory_budget is not None:
        return int(cfg.memory_budget * GB)
    if cfg.device != "cpu" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    return None


def plan_memory(
    cfg: FinescopeConfig,
    config: PretrainedConfig,
    budget: int | None = None,
    *,
    teacher: PretrainedConfig | None = None,
) -> MemoryPlan:
    """Every model stage's predicted peak for `cfg` on a model of `config` (the teacher's own config
    when it is another model), in the stage order of a run."""
    elem = DTYPE_BYTES[_dtype_name(cfg)]
    s = Shapes.of(config)
    weights = int(s.params * elem * (1 + LOAD_OVERHEAD))
    t = s if teacher is None else Shapes.of(teacher)
    teacher_weights = int(t.params * elem * (1 + LOAD_OVERHEAD))
    pruned_params = int(s.params - cfg.prune.ratio * s.params)
    pruned = int(pruned_params * elem * (1 + LOAD_OVERHEAD))
    load, t_load = (
        _conversion(cfg, config, s.params, elem),
        _conversion(cfg, teacher or config, t.params, elem),
    )
    stages = (
        _curation(cfg, s, elem, weights),
        _activations(cfg, s, elem, weights),
        _prune(cfg, s, elem, weights),
        _teacher(cfg, t, elem, teacher_weights),
        _finetune(cfg, s, elem, pruned, pruned_params, teacher_weights),
        StagePeak(
            "evaluation",
            {
                "weights": weights,
                "activations": s.inference_activations(cfg.evaluate.max_length * 8, elem, _on_cpu(cfg)),
            },
        ),
    )
    # The shared copy is loaded once, by the first stage that runs it (saliency); preflight checks the
    # largest stage, so where the load falls (activations, when saliency is reused) does not matter.
    student_load = int(load * (1 - cfg.prune.ratio))
    loading = {
        "saliency": load,
        "activations": 0,
        "pruned": load,
        "distilled": t_load,
        "evaluation": load,
        "tuned": t_load if cfg.finetune.kd_weight > 0 else student_load,
    }
    planned = tuple(StagePeak(p.name, p.parts, loading[p.name]) for p in stages)
    return MemoryPlan(planned, s.params * elem, budget)


def _conversion(cfg: FinescopeConfig, config: PretrainedConfig, params: int, elem: int) -> int:
    """Host bytes a checkpoint stored in a wider dtype than the run's occupies while it is converted:
    the whole checkpoint, read beside the converted weights. Only on a CPU run does that host memory
    count (a GPU run converts in host memory, not the device's)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    stored_elem = DTYPE_BYTES.get(name, 4)
    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return params * stored_elem if on_cpu and stored_elem > elem else 0


def _on_cpu(cfg: FinescopeConfig) -> bool:
    return cfg.device == "cpu" or not torch.cuda.is_available()


def _dtype_name(cfg: FinescopeConfig) -> str:
    if cfg.model_dtype != "auto":
        return cfg.model_dtype
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def _curation(cfg: FinescopeConfig, s: Shapes, elem: int, weights: int) -> StagePeak:
    """Saliency and activations share the one cached model; the Jacobian probes backpropagate."""
    tokens = cfg.curate.batch_size * cfg.curate.max_length
    return StagePeak("saliency", {"weights": weights, "activations": s.train_activations(tokens, elem)})


def _activations(cfg: FinescopeConfig, s: Shapes, elem: int, weights: int) -> StagePeak:
    """Pooled activations: the shared model's forward passes, no gradients."""
    tokens = cfg.curate.batch_size * cfg.curate.max_length
    return StagePeak(
        "activations",
        {"weights": weights, "activations": s.inference_activations(tokens, elem, _on_cpu(cfg))},
    )


def _prune(cfg: FinescopeConfig, s: Shapes, elem: int, weights: int) -> StagePeak:
    """A private copy (the shared one evicted), one float32 gradient accumulator over one chunk's
    projections (`prune.chunks`: all of them in float32; under bf16 as many layers as fit the bound,
    plus the one bf16 gradient being folded), and the scoring's float32 temporaries."""
    tokens = cfg.prune.batch_size * cfg.prune.max_length
    folding = s.largest_param * elem if elem != 4 else 0
    return StagePeak(
        "pruned",
        {
            "weights": weights,
            "gradients": importance_sums(s, elem) + folding,
            "activations": s.train_activations(tokens, elem),
            "scoring": 2 * s.largest_param * 4,
        },
    )


def importance_sums(s: Shapes, elem: int) -> int:
    """Bytes of the float32 gradient sums one importance pass holds: its chunk's layers' projections
    (the layers are alike, so the chunking is that of `layer_chunks` over equal layers)."""
    per_layer = 4 * s.projection_params // s.layers
    chunks = layer_chunks([per_layer] * s.layers, sums_limit(s.params * elem, elem))
    return max(len(c) for c in chunks) * per_layer


def _teacher(cfg: FinescopeConfig, s: Shapes, elem: int, weights: int) -> StagePeak:
    """Generation: the teacher's weights and the KV cache of one batch of prompts and answers."""
    new = 256 if cfg.teacher.max_new_tokens == "auto" else cfg.teacher.max_new_tokens
    tokens = cfg.teacher.batch_size * (cfg.teacher.max_prompt_length + new)
    return StagePeak(
        "distilled",
        {
            "weights": weights if cfg.teacher.backend == "hf" else 0,
            "kv_cache": s.kv_cache(tokens, elem),
            "activations": s.inference_activations(
                cfg.teacher.batch_size * cfg.teacher.max_prompt_length, elem, _on_cpu(cfg)
            ),
        },
    )


def _finetune(
    cfg: FinescopeConfig, s: Shapes, elem: int, pruned: int, params: int, teacher: int
) -> StagePeak:
    """The student (pruned), the teacher when distilling, what training keeps per trained parameter
    (LoRA: float32 adapters; full: gradients and AdamW moments, plus float32 master weights under a
    16-bit dtype), and activations with or without gradient checkpointing. An unresolved `method: auto`
    is planned as full tuning, the larger (flows resolve it first: `finetune_choice.resolve_finetune`)."""
    f = cfg.finetune
    tokens = f.batch_size * f.max_length
    adapter_inputs = 0
    if f.method == "lora":
        trained = _lora_params(s, f.rank, params / s.params)
        training = trained * 4 * (2 + ADAM_STATES)  # float32 adapter, its gradient, two moments
        adapter_inputs = _lora_inputs(s, f, elem, params / s.params) * tokens
        if f.gradient_checkpointing:  # kept for the one layer being recomputed
            adapter_inputs //= s.layers
    else:
        training = params * (elem + 4 * ADAM_STATES + (4 if elem != 4 else 0))
    parts: dict[str, Any] = {
        "weights": pruned,
        "training": training,
        "adapter_inputs": adapter_inputs,
        "activations": s.train_activations(tokens, elem, checkpointing=f.gradient_checkpointing),
        "teacher": teacher + s.inference_activations(tokens, elem, _on_cpu(cfg)) if f.kd_weight > 0 else 0,
    }
    return StagePeak("tuned", parts)


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
"""Projections of a decoder layer that read the same input tensor."""


def _lora_inputs(s: Shapes, f: FinetuneConfig, elem: int, kept: float) -> int:
    """Bytes per token autograd keeps for peft's float32 LoRA branches (measured with saved-tensor
    hooks): each adapter's rank-wide `lora_A` output, and its input: with dropout > 0 the dropout's
    float32 noise mask and output per adapted projection; without, under a 16-bit model the input
    cast to float32 per projection (q, k and v each cast their own copy), in float32 the projection's
    own input, once per tensor the projections read."""
    width = {"down_proj": int(s.intermediate * kept)}
    each = sum(width.get(name, s.hidden) for name in f.target_modules)
    if f.dropout > 0:
        inputs = 2 * each
    elif elem != 4:
        inputs = each
    else:
        read = [g for g in SHARED_INPUTS if any(name in f.target_modules for name in g)]
        inputs = sum(width.get(g[0], s.hidden) for g in read)
    return s.layers * (inputs + len(f.target_modules) * f.rank) * 4


def _lora_params(s: Shapes, rank: int, kept: float) -> int:
    """Adapter parameters: rank x (in + out) per adapted projection, seven per layer, widths as kept."""
    widths = 2 * (2 * s.hidden) + 2 * (s.hidden + s.kv_width) + 3 * (s.hidden + s.intermediate)
    return int(s.layers * rank * widths * kept)


VLLM_MAX_UTILIZATION = 0.9
"""vLLM's own default share of the GPU: the rest is left to the CUDA context and other allocations."""


def vllm_engine_settings(
    teacher: TeacherConfig, memory_budget: float | None, max_new_tokens: int, free: int, total: int
) -> dict[str, float | int]:
    """`gpu_memory_utilization` and `max_model_len` for the vLLM teacher, from what this process leaves.

    vLLM reserves `gpu_memory_utilization` x the device's total memory at start and fails when less is
    free, so the share is taken from the memory free once the process has released its own models
    (`free`), capped by `memory_budget` and by vLLM's default 0.9. `max_model_len` is the longest
    sequence the teacher stage makes (prompt budget plus answer budget), so the KV cache is sized for
    it rather than for the model's whole context.

    Raises:
        MemoryBudgetError: when the share left is too small to start vLLM, naming the numbers and fixes.
    """
    budget = free if memory_budget is None else min(free, int(memory_budget * GB))
    share = min(VLLM_MAX_UTILIZATION, int(100 * budget / total) / 100) if total > 0 else 0.0
    if share < 0.05:
        raise MemoryBudgetError(
            f"stage 'distilled' (teacher.backend: vllm): {budget / GB:.2f} GB of the GPU's "
            f"{total / GB:.2f} GB is left for vLLM, too little to start it. Fixes, in order: free the GPU "
            "of other processes; raise memory_budget; teacher.backend: hf with teacher.device_map: auto"
        )
    return {"gpu_memory_utilization": share, "max_model_len": teacher.max_prompt_length + max_new_tokens}

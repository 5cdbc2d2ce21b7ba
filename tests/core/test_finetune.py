"""Tests of finescope_core.finetune on tiny random decoders: masking, LoRA merge, training, outputs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, PreTrainedModel

from finescope_core.config import FinetuneConfig
from finescope_core.finetune import (
    IGNORE,
    FinetuneError,
    attach_lora,
    build_examples,
    evaluate_loss,
    lora_finetune,
    pad_batch,
    response_loss,
    split_indices,
)
from finescope_core.model import resolve_arch
from finescope_core.prompts import encode_prompt
from finescope_core.tiny import byte_tokenizer, tiny_model

ROWS = [
    {"prompt": "Add 2 and 3.", "response": "5"},
    {"prompt": "Name a colour of the sky on a clear day.", "response": "Blue."},
    {"prompt": "Hi", "response": "Hello, how can I help?"},
    {"prompt": "Spell cat backwards.", "response": "tac"},
]
SMALL = dict(
    method="lora", rank=4, alpha=8, dropout=0.0, batch_size=2, grad_accum=1, max_length=128, kd_weight=0.0
)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    enc = byte_tokenizer()(["Add 2 and 3.", "Hello there, friend"], padding=True, return_tensors="pt")
    return model(**enc).logits


def test_labels_mask_exactly_the_prompt_and_padding() -> None:
    tok = byte_tokenizer()
    built = build_examples(tok, ROWS, cutoff=128)
    assert built.dropped == built.truncated == 0
    for row, ex in zip(ROWS, built.examples, strict=True):
        prompt = encode_prompt(tok, row["prompt"])
        response = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["input_ids"] == prompt + response
        assert ex["labels"] == [IGNORE] * len(prompt) + response
    batch = pad_batch(built.examples, tok.pad_token_id)
    for i, ex in enumerate(built.examples):
        n, n_prompt = len(ex["input_ids"]), ex["labels"].count(IGNORE)
        expected = torch.full((batch["labels"].shape[1],), True)
        expected[n_prompt:n] = False
        assert torch.equal(batch["labels"][i] == IGNORE, expected)
        assert batch["attention_mask"][i].sum() == n and (batch["input_ids"][i, n:] == tok.pad_token_id).all()


def test_model_loss_with_these_labels_is_the_response_only_cross_entropy() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    batch = pad_batch(build_examples(tok, ROWS, cutoff=128).examples, tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
        logp = F.log_softmax(out.logits.float(), dim=-1)
        terms = []
        for i in range(len(ROWS)):
            for t in range(1, batch["input_ids"].shape[1]):
                target = int(batch["labels"][i, t])
                if target != IGNORE:  # position t is predicted from t-1
                    terms.append(-logp[i, t - 1, target])
        hand = torch.stack(terms).mean()
        summed, count = response_loss(model, batch)
    assert count == len(terms)
    assert_close(out.loss, hand)
    assert_close(summed / count, hand)


def test_truncation_keeps_the_prompt_and_drops_prompts_that_fill_the_cutoff() -> None:
    tok = byte_tokenizer()
    prompt_len = len(encode_prompt(tok, "Hi"))
    built = build_examples(
        tok, [{"prompt": "Hi", "response": "x" * 50}, {"prompt": "y" * 80, "response": "z"}], prompt_len + 5
    )
    assert built.dropped == 1 and built.truncated == 1 and len(built.examples) == 1
    ex = built.examples[0]
    assert len(ex["input_ids"]) == prompt_len + 5 and ex["input_ids"][:prompt_len] == encode_prompt(tok, "Hi")
    assert ex["labels"] == [IGNORE] * prompt_len + ex["input_ids"][prompt_len:]
    assert tok.eos_token_id not in ex["labels"]


def test_split_is_seeded_and_disjoint() -> None:
    train, held = split_indices(10, 0.2, seed=1)
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    assert (train, held) == split_indices(10, 0.2, seed=1) and held != split_indices(10, 0.2, seed=2)[1]
    assert split_indices(3, 0.1, seed=0)[1] != [] and split_indices(3, 0.0, seed=0)[1] == []


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_merged_weight_is_w_plus_scaled_ba_and_logits_match(arch: str) -> None:
    model = tiny_model(arch)
    base_w = resolve_arch(model).attention[0].q_proj.weight.detach().clone()
    cfg = FinetuneConfig(**SMALL)
    peft_model = attach_lora(model, cfg, seed=0)
    layer = next(m for n, m in peft_model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    with torch.no_grad():  # B starts at zero; give it values so the merge has something to add
        for _, m in peft_model.named_modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].weight.normal_(0, 0.1)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    peft_model.eval()
    peft_logits = _logits(peft_model)
    merged = peft_model.merge_and_unload()
    assert_close(resolve_arch(merged).attention[0].q_proj.weight, base_w + (cfg.alpha / cfg.rank) * b @ a)
    assert_close(_logits(merged), peft_logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(tiny_model(arch)), peft_logits, atol=1e-3)


def test_unknown_target_module_is_named() -> None:
    with pytest.raises(FinetuneError, match="qkv_proj"):
        attach_lora(tiny_model(), FinetuneConfig(**SMALL | {"target_modules": ["q_proj", "qkv_proj"]}))


def _expressive_tiny() -> PreTrainedModel:
    """A tiny model whose random lm_head is large enough to express peaked distributions (at init
    scale its logits stay within about +-1 after the final norm, so no adapter could fit the data)."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def test_training_reduces_loss_and_writes_adapter_merged_and_report(tmp_path: Path) -> None:
    model, tok = _expressive_tiny(), byte_tokenizer()
    examples = build_examples(tok, ROWS, 128).examples
    before = evaluate_loss(model, examples, 4, tok.pad_token_id)
    cfg = FinetuneConfig(**SMALL | {"epochs": 15, "lr": 1e-2, "eval_fraction": 0.0})
    out = tmp_path / "tuned"
    seen: list[tuple[int, int, float]] = []
    summary = lora_finetune(model, tok, ROWS, cfg, out, progress=lambda s, n, loss: seen.append((s, n, loss)))
    assert summary.steps == 30 == len(summary.train_loss) and [s for s, _, _ in seen] == list(range(1, 31))
    assert_close(summary.train_loss[0], before, rtol=0.2, atol=0.0)
    assert evaluate_loss(model, examples, 4, tok.pad_token_id) < 0.5 * before
    assert summary.eval_loss == [] and summary.eval_loss_before is None

    assert sorted(p.name for p in out.iterdir()) == ["adapter", "finetune.json", "merged"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not any(p.name.startswith(".tuned") for p in tmp_path.iterdir())
    report = json.loads((out / "finetune.json").read_text())
    assert report["train_loss"] == summary.train_loss and report["train_examples"] == 4

    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert_close(_logits(reloaded), _logits(model))
    assert_close(evaluate_loss(reloaded, examples, 2, 0), evaluate_loss(model, examples, 2, 0))


def test_eval_loss_per_epoch_and_reruns_are_deterministic(tmp_path: Path) -> None:
    rows = ROWS * 2
    cfg = FinetuneConfig(
        **SMALL | {"epochs": 3, "lr": 5e-3, "eval_fraction": 0.25, "dropout": 0.1, "grad_accum": 2}
    )
    runs = [
        lora_finetune(_expressive_tiny(), byte_tokenizer(), rows, cfg, tmp_path / "out", seed=7)
        for _ in range(2)
    ]
    a, b = runs
    assert (a.train_examples, a.eval_examples) == (6, 2)
    assert len(a.eval_loss) == 3 and a.eval_loss_before is not None
    assert a.eval_loss[-1] < a.eval_loss_before
    assert a.steps == 3 * 2  # 6 examples / batch 2 = 3 micro-batches -> 2 steps per epoch
    assert a.train_loss == b.train_loss and a.eval_loss == b.eval_loss
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["eval_loss"] == b.eval_loss


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_training(tmp_path: Path, method: str) -> None:
    """Recomputing the activations in the backward pass changes memory, not the updates."""
    rows = ROWS * 2
    base = SMALL | {"epochs": 2, "lr": 5e-3, "eval_fraction": 0.25, "dropout": 0.1, "method": method}
    plain, ckpt = (
        lora_finetune(
            _expressive_tiny(),
            byte_tokenizer(),
            rows,
            FinetuneConfig(**base | {"gradient_checkpointing": on}),
            tmp_path / f"out-{on}",
            seed=3,
        )
        for on in (False, True)
    )
    assert ckpt.train_loss == pytest.approx(plain.train_loss, rel=1e-5)
    assert ckpt.eval_loss == pytest.approx(plain.eval_loss, rel=1e-5)


def test_no_usable_rows_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="max_length"):
        lora_finetune(
            tiny_model(),
            byte_tokenizer(),
            [{"prompt": "p" * 200, "response": "r"}],
            FinetuneConfig(**SMALL),
            tmp_path / "out",
        )


@pytest.mark.slow
def test_default_model_lora_step_and_merged_reload(tmp_path: Path) -> None:
    """One LoRA step on SmolLM2-135M (tied embeddings); the merged directory reloads to the same logits."""
    from finescope_core.model import load_model

    model, tok = load_model("default", Path(__file__).resolve().parents[2] / ".finescope-cache", device="cpu")
    cfg = FinetuneConfig(
        method="lora",
        rank=8,
        alpha=16,
        batch_size=4,
        grad_accum=1,
        epochs=1,
        eval_fraction=0.0,
        max_length=96,
    )
    summary = lora_finetune(model, tok, ROWS, cfg, tmp_path / "out")
    assert summary.steps == 1 and summary.trainable_params > 0
    enc = tok(["Add 2 and 3."], return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    with torch.no_grad():
        assert_close(reloaded(**enc).logits, model(**enc).logits)


def test_full_bf16_tuning_tracks_float32_and_pure_bf16_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full tuning of a bf16 model keeps float32 master weights (autocast to bf16): over 16 AdamW steps
    at lr 1e-4 its per-step loss stays within 0.005 nats of the float32 run's. Pure bf16 (the weights
    themselves in bf16, as before) rounds most updates away and drifts more than 0.015 from it."""
    import finescope_core.finetune.stage as ft

    cfg = FinetuneConfig(
        **{
            **SMALL,
            "method": "full",
            "lr": 1e-4,
            "epochs": 4,
            "eval_fraction": 0.0,
            "warmup_ratio": 0.0,
            "max_grad_norm": 1e9,
        }
    )

    def losses(dtype: torch.dtype, name: str) -> list[float]:
        model = tiny_model("llama").to(dtype)
        summary = lora_finetune(model, byte_tokenizer(), ROWS * 2, cfg, tmp_path / name, seed=0)
        assert next(model.parameters()).dtype == dtype, "the model goes back to its dtype after training"
        return summary.train_loss

    reference = losses(torch.float32, "fp32")
    mixed = losses(torch.bfloat16, "mixed")

    @contextlib.contextmanager
    def pure_bf16(model: torch.nn.Module, *, full: bool) -> Iterator[None]:
        yield None

    monkeypatch.setattr(ft, "master_weights", pure_bf16)
    pure = losses(torch.bfloat16, "pure")
    assert len(reference) == len(mixed) == len(pure) == 16
    assert max(abs(a - b) for a, b in zip(reference, mixed, strict=True)) < 0.005
    assert max(abs(a - b) for a, b in zip(reference, pure, strict=True)) > 0.015


def test_lora_adapters_on_a_bf16_model_are_float32() -> None:
    model = attach_lora(tiny_model("llama").to(torch.bfloat16), FinetuneConfig(**SMALL), seed=0)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)

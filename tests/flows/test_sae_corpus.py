"""`curate.sae_corpus`: the SAEs train on a general corpus, one SAE set serves every corpus and seed set.

The sae corpus is read and validated in preflight like the corpus, stored by content hash, embedded at
coordinates chosen on it, and the SAEs train on its activations; the corpus being curated is encoded
with those SAEs. Bad sae-corpus input is refused before any model work, naming the field and the file.
"""

import contextlib
import io
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_curate_flow import TOPICS

from finescope_core import curate as core
from finescope_core.config import FinescopeConfig, load_config, path_fields
from finescope_core.saliency import LayerSaliency
from finescope_core.store import ArtifactStore
from finescope_core.tiny import save_tiny
from flows.cli import main
from flows.curate import curate_flow
from flows.plan import plan
from tasks.activations import activation_dirs, listed_shards
from tasks.caching import artifact_dir
from tasks.codes import codes_key
from tasks.context import RunContext
from tasks.data import read_sae_corpus
from tasks.models import model_ref
from tasks.saliency import saliency_key

GENERAL = [
    "The {a} river runs past {b} old mills.",
    "A recipe for {a} loaves needs {b} eggs.",
    "Train number {a} leaves platform {b} at noon.",
    "The museum shows {a} paintings from {b} painters.",
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model; two corpora to curate (other numbers, so other records); a general corpus; seeds."""
    root = tmp_path_factory.mktemp("sae-corpus")
    save_tiny(root / "model", "qwen3", hidden=48, layers=3, intermediate=96)
    for name, offset in (("corpus_a", 0), ("corpus_b", 100)):
        rows = [
            {"id": f"{t}-{i}", "text": tpl[i % 3].format(a=i + offset, b=i * 7 % 13)}
            for t, tpl in TOPICS.items()
            for i in range(30)
        ]
        _jsonl(root / f"{name}.jsonl", rows)
    general = [{"id": f"g{i}", "text": GENERAL[i % 4].format(a=i, b=i * 5 % 11)} for i in range(48)]
    _jsonl(root / "general.jsonl", general + [{"id": "g-dup", "text": general[0]["text"]}])
    _jsonl(root / "seeds.jsonl", [{"id": f"s{i}", "text": f"Compute {i} times 3."} for i in (4, 5, 6)])
    return root


def config(
    ws: Path, store: Path, corpus: str = "corpus_a", sae_corpus: bool = True, **over
) -> FinescopeConfig:
    curate = dict(
        final_size=15,
        top_m=12,
        k_act=16,
        probes=1,
        reference_size=12,
        max_length=24,
        batch_size=8,
        shard_size=25,
        sae={"d_sae": 48, "steps": 25, "batch_size": 16},
    )
    if sae_corpus:
        curate["sae_corpus"] = [str(ws / "general.jsonl")]
    return FinescopeConfig(
        model=str(ws / "model"),
        seeds=[str(ws / "seeds.jsonl")],
        corpus=[str(ws / f"{corpus}.jsonl")],
        store=str(store),
        device="cpu",
        curate=curate,
        **over,
    )


def sae_weights(root: Path) -> dict[str, torch.Tensor]:
    return {
        f"{d.name}/{k}": v
        for d in sorted(root.glob("layer_*"))
        for k, v in load_file(d / "sae.safetensors").items()
    }


@pytest.fixture(scope="module")
def runs(ws, tmp_path_factory):
    """In one store: corpus A without an sae corpus, corpus A with it, corpus B with it."""
    store = tmp_path_factory.mktemp("store") / "store"
    out = tmp_path_factory.mktemp("out")
    plain = curate_flow(config(ws, store, sae_corpus=False), export=False)
    first_cfg = config(ws, store, output=str(out / "a"))
    first = curate_flow(first_cfg)
    second_cfg = config(ws, store, corpus="corpus_b")
    second = curate_flow(second_cfg, export=False)
    return {
        "plain": plain,
        "first": first,
        "first_cfg": first_cfg,
        "second": second,
        "second_cfg": second_cfg,
        "store": store,
        "out": out / "a",
    }


def test_saes_train_on_the_sae_corpus_activations(runs, tmp_path):
    plain, first, cfg = runs["plain"], runs["first"], runs["first_cfg"]
    assert plain.sae_corpus is None and plain.sae_activations is None
    assert plain.sae.info["trained_on"] == {"stage": "corpus", "sha256": plain.corpus.sha256, "records": 60}
    # The sae corpus: validated and de-duplicated like the corpus, its own content-addressed artifact.
    assert first.sae_corpus.stage == "sae-corpus" and first.sae_corpus.info["records"] == 48
    assert first.sae_corpus.info["dropped_duplicates"] == ["g-dup"]
    assert first.sae_activations.stage == "activations" and first.sae_activations.info["rows"] == 48
    assert first.sae.info["trained_on"] == {
        "stage": "sae-corpus",
        "sha256": first.sae_corpus.sha256,
        "records": 48,
    }
    # The saliency is taken on the sae corpus, so the coordinates do not depend on what is curated.
    store = ArtifactStore(cfg.store)
    ref = model_ref(cfg.model, store)
    assert (
        first.saliency.key
        == saliency_key(cfg.curate, RunContext.of(cfg), ref.sha256, first.sae_corpus.sha256, first.layers).key
    )
    assert first.saliency.key != plain.saliency.key
    # Same corpus and seeds, another SAE: its key hashes the sae corpus's activations.
    assert first.corpus.key == plain.corpus.key and first.sae.key != plain.sae.key
    assert first.activations.key != first.sae_activations.key

    # The stored SAEs are those trained directly on the sae corpus's activations...
    indices = LayerSaliency.load(artifact_dir(store, first.saliency)).indices
    direct = tmp_path / "direct"
    direct.mkdir()
    core.sae_stage(
        activation_dirs(store, first.sae_activations), first.layers, indices, cfg.curate, cfg.seed, direct
    )
    stored = sae_weights(artifact_dir(store, first.sae))
    trained = sae_weights(direct)
    assert stored.keys() == trained.keys() and stored
    assert all(torch.equal(stored[k], trained[k]) for k in stored)
    # ... and not those the same settings train on the curated corpus's activations.
    on_corpus = tmp_path / "on-corpus"
    on_corpus.mkdir()
    core.sae_stage(
        activation_dirs(store, first.activations), first.layers, indices, cfg.curate, cfg.seed, on_corpus
    )
    assert any(not torch.equal(stored[k], v) for k, v in sae_weights(on_corpus).items())

    # The curated corpus is encoded with those SAEs, shard by shard.
    shards = listed_shards(store, first.activations)
    assert [c.key for c in first.codes] == [
        codes_key(cfg.curate, RunContext.of(cfg), s["sha256"], first.sae.sha256).key for s in shards
    ]
    assert sum(c.info["rows"] for c in first.codes) == 60

    # run.json lists the new stages.
    run = json.loads((runs["out"] / "run.json").read_text())
    assert run["stages"]["sae_corpus"]["key"] == first.sae_corpus.key
    assert run["stages"]["sae_activations"]["key"] == first.sae_activations.key
    assert [m.stage for m in first.stages()] == [
        "corpus",
        "seeds",
        "sae-corpus",
        "saliency",
        "activations",
        "activations",
        "activations",
        "sae",
        "curated",
    ]


def test_one_sae_set_serves_every_corpus(runs):
    first, second = runs["first"], runs["second"]
    assert second.corpus.key != first.corpus.key
    # Everything computed from the sae corpus alone is reused: the same artifacts, reported as cached.
    for name in ("sae_corpus", "saliency", "sae_activations", "sae"):
        a, b = getattr(first, name), getattr(second, name)
        assert (b.key, b.uri, b.cached) == (a.key, a.uri, True), name
    # The other corpus is embedded, encoded and curated anew.
    assert second.activations.cached is False and second.activations.key != first.activations.key
    assert not any(c.cached for c in second.codes)
    assert {c.key for c in second.codes}.isdisjoint(c.key for c in first.codes)
    assert second.curated.cached is False and second.curated.key != first.curated.key


def test_plan_lists_the_sae_corpus_stages_under_the_runs_keys(runs):
    cfg, result = runs["second_cfg"], runs["second"]
    p = plan(cfg, "curate")
    rows = {s.name: s for s in p.stages}
    assert [s.name for s in p.stages] == [
        "corpus",
        "seeds",
        "sae-corpus",
        "saliency",
        "activations (corpus)",
        "activations (seeds)",
        "activations (sae-corpus)",
        "sae",
        "sae-codes",
        "curated",
    ]
    assert all(s.status == "reuse" for s in p.stages)
    ran = {
        "sae-corpus": result.sae_corpus,
        "saliency": result.saliency,
        "activations (sae-corpus)": result.sae_activations,
        "sae": result.sae,
        "curated": result.curated,
    }
    assert {n: (rows[n].stage, rows[n].key) for n in ran} == {n: (m.stage, m.key) for n, m in ran.items()}
    # `store gc` keeps what a plan names: the sae corpus, its activations and their shards too.
    shards = {(s["stage"], s["key"]) for s in listed_shards(ArtifactStore(cfg.store), result.sae_activations)}
    assert shards and shards <= p.keys()

    # Without the sae corpus's activations, the SAEs wait for them; the curated corpus's stages are reused.
    sae_acts = Path(cfg.store) / "activations" / result.sae_activations.key
    aside = sae_acts.with_name("aside")
    sae_acts.rename(aside)
    try:
        p = plan(cfg, "curate")
    finally:
        aside.rename(sae_acts)
    status = {s.name: (s.status, s.after) for s in p.stages}
    assert status["activations (sae-corpus)"] == ("compute", None)
    assert status["sae"] == ("after", "activations (sae-corpus)")
    assert status["activations (corpus)"] == ("reuse", None) and status["saliency"] == ("reuse", None)


def test_methods_without_saes_ignore_the_sae_corpus(ws, tmp_path):
    cfg = config(ws, tmp_path / "store")
    assert len(read_sae_corpus(cfg).corpus) == 48
    for method in ("activation", "sentence", "random"):
        assert (
            read_sae_corpus(
                cfg.model_copy(update={"curate": cfg.curate.model_copy(update={"method": method})})
            )
            is None
        )


def test_relative_sae_corpus_in_a_config_file_resolves_against_the_file(tmp_path, monkeypatch):
    assert path_fields()["curate.sae_corpus"] == "always"
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    cfg_file = conf_dir / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "seeds": ["seeds.jsonl"],
                "corpus": ["corpus.jsonl"],
                "curate": {
                    "sae_corpus": ["data/general.jsonl", "../shared/*.parquet", "s3://bucket/web.jsonl"]
                },
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file)
    assert cfg.curate.sae_corpus == [
        str(conf_dir / "data" / "general.jsonl"),
        str(tmp_path / "shared" / "*.parquet"),
        "s3://bucket/web.jsonl",
    ]
    # Command-line overrides stay relative to the working directory, as for every path field.
    assert load_config(cfg_file, {"curate.sae_corpus": ["web.jsonl"]}).curate.sae_corpus == ["web.jsonl"]
    # One file may be given as a plain string, as for `corpus`; an empty list is refused.
    cfg_file.write_text(
        yaml.safe_dump(
            {"seeds": ["s.jsonl"], "corpus": ["c.jsonl"], "curate": {"sae_corpus": "general.jsonl"}}
        )
    )
    assert load_config(cfg_file).curate.sae_corpus == [str(conf_dir / "general.jsonl")]
    assert load_config(cfg_file, {"curate.sae_corpus": "web.jsonl"}).curate.sae_corpus == ["web.jsonl"]
    with pytest.raises(ValueError, match="give at least one file or URI"):
        load_config(cfg_file, {"curate.sae_corpus": []})


def _run(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of `finescope <argv>` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _bad_general(tmp: Path, case: str) -> str:
    good = "".join(json.dumps({"id": f"g{i}", "text": f"general record {i}"}) + "\n" for i in range(2))
    if case == "empty-file":
        return _write(tmp / "general.jsonl", "\n  \n")
    if case == "malformed-line":
        return _write(tmp / "general.jsonl", good + '{"text": "unterminated\n')
    if case == "no-text-field":
        return _write(tmp / "general.jsonl", good + json.dumps({"id": "x", "body": "hi"}) + "\n")
    if case == "one-distinct-record":
        return _write(
            tmp / "general.jsonl", json.dumps({"text": "same"}) + "\n" + json.dumps({"text": "SAME "}) + "\n"
        )
    return str(tmp / "general.jsonl")  # missing


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty-file", ["general.jsonl", "the file is empty"]),
        ("malformed-line", ["general.jsonl:3", "malformed JSON"]),
        ("no-text-field", ["general.jsonl:3", "no 'text' and no 'instruction'"]),
        ("missing-file", ["general.jsonl", "no such file"]),
        ("one-distinct-record", ["general.jsonl", "1 distinct record", "at least 2"]),
    ],
)
def test_bad_sae_corpus_is_refused_before_any_model_work(ws, tmp_path, monkeypatch, case, expected):
    import tasks.models

    loaded = []
    monkeypatch.setattr(tasks.models, "cached_model", lambda *a, **k: loaded.append(a))
    cfg = config(ws, tmp_path / "store").model_dump(mode="json")
    cfg["curate"]["sae_corpus"] = [_bad_general(tmp_path, case)]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    code, err = _run(["curate", "--config", str(cfg_file), "--out", str(tmp_path / "out")])
    assert code == 2
    message = err[err.index("finescope: error:") :]
    assert "curate.sae_corpus" in message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert time.perf_counter() - start < 20
    assert loaded == [] and not (tmp_path / "store").exists() and not (tmp_path / "out").exists()

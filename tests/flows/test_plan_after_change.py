"""`store plan` agrees with a real re-run after each kind of change: a model file, a stage's code, the
dtype, an input file. Each change is planned, then run: what the plan reuses is cached under the same key,
what it computes is computed under the same key, and the stages it plans after those are left to the run."""

import contextlib
import json

import pytest
from test_fanout import write_inputs

import tasks.retrieve
import tasks.saliency
from finescope_core.config import FinescopeConfig
from flows.curate import curate_flow
from flows.plan import plan

BELOW_SALIENCY = {"activations (corpus)", "activations (seeds)", "sae", "sae-codes", "curated"}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = write_inputs(tmp_path_factory.mktemp("plan-change"))
    cfg = FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        curate=dict(
            final_size=15,
            top_m=12,
            k_act=16,
            probes=1,
            reference_size=12,
            max_length=24,
            batch_size=8,
            shard_size=25,
            sae={"d_sae": 48, "steps": 25, "batch_size": 16},
        ),
    )
    curate_flow(cfg, export=False)
    return cfg, root


@contextlib.contextmanager
def model_file(cfg, root, monkeypatch):
    template = root / "model" / "chat_template.jinja"  # transformers 5 writes it beside the tokenizer
    original = template.read_text()
    template.write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    try:
        yield cfg
    finally:
        template.write_text(original)


@contextlib.contextmanager
def saliency_code(cfg, root, monkeypatch):
    with monkeypatch.context() as m:  # as an edit of finescope_core/saliency.py would (see test_key_identity)
        m.setattr(tasks.saliency.SaliencyKey, "code", classmethod(lambda cls: "edited saliency code"))
        yield cfg


@contextlib.contextmanager
def retrieval_code(cfg, root, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(tasks.retrieve.CuratedKey, "code", classmethod(lambda cls: "edited retrieval code"))
        yield cfg


@contextlib.contextmanager
def dtype(cfg, root, monkeypatch):
    yield cfg.model_copy(update={"model_dtype": "bfloat16"})


@contextlib.contextmanager
def input_file(cfg, root, monkeypatch):
    corpus = root / "corpus.jsonl"
    original = corpus.read_text()
    corpus.write_text(original + json.dumps({"id": "new-1", "text": "Compute 11 times 12 and add 4."}) + "\n")
    try:
        yield cfg
    finally:
        corpus.write_text(original)


# change -> (the stages planned to compute, the stages planned after them, whether the run computes those
# too: a model, dtype or input change reaches them through their own keys; a code change to saliency that
# leaves its output unchanged reuses them, as content addressing should)
CHANGES = {
    model_file: ({"saliency"}, BELOW_SALIENCY, True),
    saliency_code: ({"saliency"}, BELOW_SALIENCY, False),
    retrieval_code: ({"curated"}, set(), False),
    dtype: ({"saliency"}, BELOW_SALIENCY, True),
    input_file: ({"corpus"}, {"saliency", *BELOW_SALIENCY}, True),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=[c.__name__ for c in CHANGES])
def test_plan_agrees_with_a_rerun_after_a_change(baseline, change, monkeypatch):
    cfg, root = baseline
    compute, after, recomputed = CHANGES[change]
    with change(cfg, root, monkeypatch) as changed:
        planned = {s.name: s for s in plan(changed, "curate").stages}
        assert {n for n, s in planned.items() if s.status == "compute"} == compute
        assert {n for n, s in planned.items() if s.status == "after"} == after
        result = curate_flow(changed, export=False)
    ran = {
        "corpus": result.corpus,
        "seeds": result.seeds,
        "saliency": result.saliency,
        "activations (corpus)": result.activations,
        "activations (seeds)": result.seed_activations,
        "sae": result.sae,
        "curated": result.curated,
    }
    for name, manifest in ran.items():
        s = planned[name]
        if s.status != "after":
            assert (manifest.cached, manifest.key) == (s.status == "reuse", s.key), name
        elif recomputed:
            assert not manifest.cached, name
    again = plan(cfg, "curate").stages
    assert all(s.status == "reuse" for s in again), [
        (s.name, s.status) for s in again
    ]  # undone: as first run

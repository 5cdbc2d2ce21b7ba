"""`finescope store ls | plan | rm | gc` against stores written by real tiny runs.

The plan must agree with what a run does: after a run every stage is reused under the run's own keys,
and after one artifact is deleted exactly that stage computes, the stages below it wait on it, and the
stages above it are reused.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fanout import write_inputs
from test_specialize_flow import config as specialize_config
from test_specialize_flow import write_workspace

from finescope_core.config import FinescopeConfig
from finescope_core.store import ArtifactStore
from flows.cli import main
from flows.curate import curate_flow
from flows.plan import plan
from flows.specialize import specialize_flow

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def moved_away(store: str, stage: str, key: str):
    """The artifact is gone for the duration (a cache miss), then put back unchanged."""
    src = Path(store) / stage / key
    aside = Path(store).parent / f"aside-{stage}-{key}"
    src.rename(aside)
    try:
        yield
    finally:
        aside.rename(src)


def statuses(p) -> dict[str, tuple[str, str | None]]:
    return {s.name: (s.status, s.after) for s in p.stages}


def write_config(cfg: FinescopeConfig, path: Path) -> Path:
    path.write_text(cfg.model_dump_json())
    return path


# --- curate: every stage, exhaustively ------------------------------------------------------------


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory):
    root = write_inputs(tmp_path_factory.mktemp("store-curate"))
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
    return cfg, curate_flow(cfg), write_config(cfg, root / "cfg.json")


CURATE_ROWS = (
    "corpus",
    "seeds",
    "saliency",
    "activations (corpus)",
    "activations (seeds)",
    "sae",
    "sae-codes",
    "curated",
)


def test_plan_after_a_curate_run_reuses_every_stage_under_the_runs_keys(curated_run):
    cfg, result, _ = curated_run
    p = plan(cfg, "curate")
    assert [s.name for s in p.stages] == list(CURATE_ROWS)
    assert all(s.status == "reuse" for s in p.stages)
    named = [n for n in CURATE_ROWS if n != "sae-codes"]
    ran = dict(
        zip(
            named,
            (
                result.corpus,
                result.seeds,
                result.saliency,
                result.activations,
                result.seed_activations,
                result.sae,
                result.curated,
            ),
            strict=True,
        )
    )
    assert {s.name: (s.stage, s.key) for s in p.stages if s.name != "sae-codes"} == {
        n: (m.stage, m.key) for n, m in ran.items()
    }
    codes = p.stages[6]  # one artifact per corpus shard, listed as parts (no gathered artifact)
    assert (
        codes.key is None
        and [x.key for x in codes.parts] == [c.key for c in result.codes]
        and len(codes.parts) == 3
    )
    corpus_acts = p.stages[3]
    assert len(corpus_acts.parts) == 3 and all(
        x.reused for x in corpus_acts.parts
    )  # 60 records, shards of 25
    assert [x.key for x in corpus_acts.parts] == [s["key"] for s in _shards(cfg, result.activations)]
    assert len(p.stages[5].parts) == 3  # one SAE task per layer


def _shards(cfg, acts):
    return json.loads((Path(cfg.store) / "activations" / acts.key / "shards.json").read_text())


# (what is deleted, the stages that compute, the stages that wait on it)
DELETIONS = {
    "corpus": (
        {"corpus"},
        {"saliency", "activations (corpus)", "activations (seeds)", "sae", "sae-codes", "curated"},
    ),
    "seeds": ({"seeds"}, {"activations (seeds)", "curated"}),
    "saliency": (
        {"saliency"},
        {"activations (corpus)", "activations (seeds)", "sae", "sae-codes", "curated"},
    ),
    "activations (corpus)": ({"activations (corpus)"}, {"sae", "sae-codes", "curated"}),
    "activations (seeds)": ({"activations (seeds)"}, {"curated"}),
    "one corpus shard": ({"activations (corpus)"}, {"sae", "sae-codes", "curated"}),
    "sae": ({"sae"}, {"sae-codes", "curated"}),
    # The curated key hashes the activations and SAEs the codes come from, so it stays known (and stored).
    "one code shard": ({"sae-codes"}, set()),
    "curated": ({"curated"}, set()),
}


@pytest.mark.parametrize("deleted", list(DELETIONS))
def test_a_deleted_curate_stage_computes_and_everything_below_it_waits(curated_run, deleted):
    cfg, result, _ = curated_run
    manifests = {
        "corpus": result.corpus,
        "seeds": result.seeds,
        "saliency": result.saliency,
        "sae": result.sae,
        "activations (corpus)": result.activations,
        "activations (seeds)": result.seed_activations,
        "curated": result.curated,
    }
    if deleted == "one corpus shard":
        shard = _shards(cfg, result.activations)[1]
        stage, key = shard["stage"], shard["key"]
    elif deleted == "one code shard":
        stage, key = result.codes[1].stage, result.codes[1].key
    else:
        stage, key = manifests[deleted].stage, manifests[deleted].key
    compute, after = DELETIONS[deleted]
    with moved_away(cfg.store, stage, key):
        p = plan(cfg, "curate")
    (blocker,) = compute
    got = statuses(p)
    assert {n for n, (s, _) in got.items() if s == "compute"} == compute
    assert {n: a for n, (s, a) in got.items() if s == "after"} == dict.fromkeys(after, blocker)
    assert {n for n, (s, _) in got.items() if s == "reuse"} == set(CURATE_ROWS) - compute - after
    if deleted == "one corpus shard":
        parts = p.stages[3].parts
        assert [x.reused for x in parts] == [True, False, True] and parts[1].key == key
    assert all(s.status == "reuse" for s in plan(cfg, "curate").stages)  # put back: all reused again


@pytest.mark.parametrize(
    ("method", "rows"),
    [
        (
            "activation",
            ["corpus", "seeds", "saliency", "activations (corpus)", "activations (seeds)", "curated"],
        ),
        ("random", ["corpus", "seeds", "curated"]),
        ("sentence", ["corpus", "seeds", "sentence-embeddings", "curated"]),
    ],
)
def test_other_methods_plan_only_their_stages_and_share_the_sae_runs(curated_run, method, rows):
    cfg, _, _ = curated_run
    other = cfg.model_copy(update={"curate": cfg.curate.model_copy(update={"method": method})})
    p = plan(other, "curate")
    assert [s.name for s in p.stages] == rows
    if (
        method == "sentence"
    ):  # the corpus's sentence embeddings are a stage of their own, then retrieval waits on it
        assert [s.status for s in p.stages] == ["reuse", "reuse", "compute", "after"]
        assert p.stages[-1].after == "sentence-embeddings"
        return
    assert [s.status for s in p.stages] == ["reuse"] * (len(rows) - 1) + ["compute"]  # only retrieval is new


def test_cli_rm_then_plan_then_run_agree(curated_run, capsys):
    cfg, result, cfg_file = curated_run
    store = ["--store", cfg.store]
    assert main(["store", "rm", "sae", *store]) == 1  # a dry run: says what would go, deletes nothing
    assert f"would delete {cfg.store}/sae/{result.sae.key}" in capsys.readouterr().out
    assert ArtifactStore(cfg.store).lookup("sae", result.sae.key) is not None
    assert main(["store", "rm", "sae", "--key", result.sae.key[:6], "--yes", *store]) == 0
    assert "deleted 1 artifacts of sae" in capsys.readouterr().out

    assert main(["store", "plan", "--flow", "curate", "--config", str(cfg_file), "--json"]) == 0
    planned = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert planned["sae"]["status"] == "compute" and planned["curated"]["after"] == "sae"
    again = curate_flow(cfg)
    for name, m in (
        ("corpus", again.corpus),
        ("saliency", again.saliency),
        ("activations (corpus)", again.activations),
        ("sae", again.sae),
    ):
        assert m.cached == (planned[name]["status"] == "reuse") and m.key == planned[name]["key"]
    assert all(s.status == "reuse" for s in plan(cfg, "curate").stages)


def test_cli_plan_text_and_overrides(curated_run, capsys):
    _, _, cfg_file = curated_run
    assert (
        main(["store", "plan", "--flow", "curate", "--config", str(cfg_file), "--curate.final_size", "10"])
        == 0
    )
    out = capsys.readouterr().out
    assert "7 reused, 1 to compute, 0 after them" in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["reuse"] * 7 + ["compute"]
    assert ["reuse", "sae-codes", "3", "shards"] in [line.split() for line in out.splitlines()]


def test_plan_needs_no_prefect_server(curated_run):
    """With the Prefect API pointing nowhere, planning still works (and quickly): nothing talks to it."""
    _, _, cfg_file = curated_run
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "store", "plan", "--flow", "curate", "--config", str(cfg_file)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "8 reused, 0 to compute" in done.stdout
    assert time.monotonic() - start < 60


def test_cli_ls_shows_every_stage_with_sizes(curated_run, capsys):
    cfg, result, _ = curated_run
    assert main(["store", "ls", "--store", cfg.store, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["stages"]) >= {
        "corpus",
        "seeds",
        "saliency",
        "activation-shards",
        "activations",
        "sae-layers",
        "sae",
        "curated",
    }
    assert doc["stages"]["activation-shards"]["count"] >= 4  # 3 corpus shards + 1 seed shard
    assert doc["total"]["size"] == sum(s["size"] for s in doc["stages"].values()) > 0
    assert main(["store", "ls", "--store", cfg.store]) == 0
    out = capsys.readouterr().out
    assert f"  {result.curated.key}  " in out and "records=15" in out


def test_cli_rm_refuses_unknown_stages_and_ambiguous_keys(curated_run, capsys):
    cfg, _, _ = curated_run
    assert main(["store", "rm", "saes", "--store", cfg.store, "--yes"]) == 2
    err = capsys.readouterr().err
    assert "no artifact of stage 'saes'" in err and "stages there:" in err and "curated" in err
    assert main(["store", "rm", "activation-shards", "--key", "", "--store", cfg.store, "--yes"]) == 2
    assert "give more characters" in capsys.readouterr().err


def test_cli_gc_keeps_what_the_config_uses_and_frees_the_rest(curated_run, capsys, tmp_path):
    cfg, _, cfg_file = curated_run
    store = ArtifactStore(cfg.store)
    with store.work_dir("curated", "stale-key", resume=False) as work:
        (work / "curated.jsonl").write_bytes(b"x" * 4000)
        store.commit(work, "curated", "stale-key", {"info": {}})
    killed = store.work_base / "distilled" / "killed-run"
    killed.mkdir(parents=True)
    (killed / "distilled.jsonl").write_bytes(b"y" * 300)
    old = time.time() - 2 * 3600
    os.utime(killed / "distilled.jsonl", (old, old))
    os.utime(killed, (old, old))

    assert main(["store", "gc", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[2]: line for line in out.splitlines() if line.startswith("would delete")}
    assert f" {cfg.store}/curated/stale-key " in lines["artifact"] and f" {killed} " in lines["work"]
    assert "dry run: would free" in out and store.lookup("curated", "stale-key") is not None

    assert main(["store", "gc", "--config", str(cfg_file), "--yes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {x["kind"] for x in doc["deleted"]} == {"artifact", "work dir"} and doc["freed"] >= 4300
    assert store.lookup("curated", "stale-key") is None and not killed.exists()
    assert all(s.status == "reuse" for s in plan(cfg, "curate").stages)  # nothing the config uses went


# --- specialize and prune: the stages after curation -----------------------------------------------


@pytest.fixture(scope="module")
def specialized_run(tmp_path_factory):
    cfg = specialize_config(write_workspace(tmp_path_factory.mktemp("store-specialize")))
    return cfg, specialize_flow(cfg)


def _specialize_manifests(result) -> dict:
    out = {}
    for name, v in result.variants.items():
        label = f" ({name})" if name else ""
        out.update({f"pruned{label}": v.pruned, f"distilled{label}": v.distilled, f"tuned{label}": v.tuned})
    out.update({f"evaluation ({name})": m for name, m in result.evaluations.items()})
    out["report"] = result.report
    return out


def test_plan_after_a_specialize_run_reuses_every_stage_under_the_runs_keys(specialized_run):
    cfg, result = specialized_run
    p = plan(cfg, "specialize")
    assert all(s.status == "reuse" for s in p.stages), statuses(p)
    keys = {s.name: s.key for s in p.stages}
    assert {n: keys[n] for n in _specialize_manifests(result)} == {
        n: m.key for n, m in _specialize_manifests(result).items()
    }
    assert keys["curated"] == result.curate.curated.key
    prune_plan = plan(cfg, "prune")  # the prune flow prunes on the same curated texts: the same artifact
    assert [s.name for s in prune_plan.stages][-1] == "pruned" and all(
        s.status == "reuse" for s in prune_plan.stages
    )
    assert prune_plan.stages[-1].key == result.variants[""].pruned.key


SPECIALIZE_DELETIONS = {
    "pruned": ({"pruned"}, {"tuned", "evaluation (pruned)", "evaluation (tuned)", "report"}),
    # Every evaluation waits: its items are checked for contamination against every variant's distilled data.
    "distilled": (
        {"distilled"},
        {
            "tuned",
            "evaluation (base)",
            "evaluation (pruned)",
            "evaluation (tuned)",
            "evaluation (pruned-random)",
            "evaluation (tuned-random)",
            "report",
        },
    ),
    "tuned (random)": ({"tuned (random)"}, {"evaluation (tuned-random)", "report"}),
    "evaluation (base)": ({"evaluation (base)"}, {"report"}),
    "report": ({"report"}, set()),
    "curated": (
        {"curated"},
        {
            "pruned",
            "distilled",
            "tuned",
            "pruned (random)",
            "distilled (random)",
            "tuned (random)",
            "evaluation (base)",
            "evaluation (pruned)",
            "evaluation (tuned)",
            "evaluation (pruned-random)",
            "evaluation (tuned-random)",
            "report",
        },
    ),
}


@pytest.mark.parametrize("deleted", list(SPECIALIZE_DELETIONS))
def test_a_deleted_specialize_stage_computes_and_everything_below_it_waits(specialized_run, deleted):
    cfg, result = specialized_run
    m = {**_specialize_manifests(result), "curated": result.curate.curated}[deleted]
    compute, after = SPECIALIZE_DELETIONS[deleted]
    with moved_away(cfg.store, m.stage, m.key):
        got = statuses(plan(cfg, "specialize"))
    assert {n for n, (s, _) in got.items() if s == "compute"} == compute
    assert {n: a for n, (s, a) in got.items() if s == "after"} == dict.fromkeys(after, deleted)
    assert sum(s == "reuse" for s, _ in got.values()) == len(got) - len(compute) - len(after)


def test_prune_flow_on_a_file_plans_no_curation(specialized_run, tmp_path):
    cfg, _ = specialized_run
    texts = tmp_path / "prune.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"calibration text {i}"}) for i in range(8)) + "\n")
    other = cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"data": str(texts)})})
    p = plan(other, "prune")
    assert [(s.name, s.status) for s in p.stages] == [("pruned", "compute")]


def test_gc_by_age_keeps_recent_artifacts(specialized_run, capsys):
    cfg, _ = specialized_run
    assert main(["store", "gc", "--store", cfg.store, "--keep-days", "1"]) == 0
    assert "dry run: would free 0 B" in capsys.readouterr().out  # everything was created minutes ago

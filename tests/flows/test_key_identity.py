"""Keys that cannot go stale: a model's every file, the stage's code, the precision the work ran in, and
Prefect's result key all change the key when they change, and a long-lived process sees changed files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_TASKS_DEFAULT_PERSIST_RESULT, temporary_settings
from test_fanout import config as fanout_config
from test_fanout import write_inputs
from test_keys import BASE, stage_keys

import tasks.activations
import tasks.context
import tasks.models
from finescope_core.curate import hooked_layers
from finescope_core.data import Record
from finescope_core.store import ArtifactStore
from finescope_core.tiny import save_tiny
from tasks.activations import activation_shard_task, activations_key, gather_activations_task
from tasks.caching import RUN_RESULTS, StageManifest
from tasks.context import RunContext
from tasks.data import data_task, inputs_task, model_task, read_inputs
from tasks.evaluate import evaluation_key
from tasks.finetune import tuned_key
from tasks.identity import Precision, model_digest
from tasks.models import _file_digest, cached_model, model_ref
from tasks.teacher import distilled_key

ROOT = Path(__file__).resolve().parents[2]


def test_editing_the_chat_template_changes_the_distilled_tuned_and_evaluation_keys(tmp_path):
    model = save_tiny(tmp_path / "model", "qwen3", hidden=48, layers=2, intermediate=96)
    template = model / "chat_template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = BASE.model_copy(update={"finetune": BASE.finetune.model_copy(update={"kd_weight": 0.5})})
    records = [Record(id="r", text="t", fields={"id": "r", "text": "t"}, origin="x:1")]

    def keys() -> dict[str, str]:
        sha = model_digest(str(model))
        return {
            "distilled": distilled_key(cfg.teacher, RunContext.of(cfg), sha, records).key,
            "tuned": tuned_key(cfg.finetune, RunContext.of(cfg), "p", "d", sha).key,
            "evaluation": evaluation_key(cfg.evaluate, RunContext.of(cfg), sha, {"domain": ["x"]}).key,
        }

    before = keys()
    template.write_text("<|user|>{% for m in messages %}{{ m['content'] }}{% endfor %}")
    after = keys()
    assert all(before[s] != after[s] for s in before), (before, after)


# --- code -------------------------------------------------------------------------------------------


def _keys_of_copy(copy: Path) -> dict[str, str]:
    """Every stage's key (test_keys.stage_keys on BASE) computed by the code in `copy`, in a fresh process."""
    probe = "import json, test_keys; print(json.dumps(test_keys.stage_keys(test_keys.BASE)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(copy / "tests" / "flows")])}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=copy, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    copy = tmp_path_factory.mktemp("source")
    for part in ("finescope_core", "tasks", "tests"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


CODE_CHANGES = {
    # A module of one stage's implementation, reached through its imports: that stage alone.
    "finescope_core/prune/importance.py": {"pruned"},
    # A stage's task module: that stage alone (the key model shares it with no other stage).
    "tasks/saliency.py": {"saliency"},
    # A module of a package a stage names (`finescope_core.report`), reached through its `__init__`.
    "finescope_core/report/tables.py": {"report"},
    # A config section's module: config code only validates, values reach keys through key fields.
    "finescope_core/config/prune.py": set(),
}


@pytest.mark.parametrize("changed", list(CODE_CHANGES))
def test_changing_a_stages_source_changes_exactly_its_key(source_copy, changed):
    """On fixed input hashes only the changed stage's key moves; the stages below it move through their
    input hashes once it is recomputed (`store plan` then plans them after it, see the test below)."""
    path = source_copy / changed
    original = path.read_text()
    try:
        path.write_text(original + "\n_BEHAVIOUR_CHANGED = True\n")
        after = _keys_of_copy(source_copy)
    finally:
        path.write_text(original)
    before = stage_keys(BASE)  # this checkout: the copy's untouched files hash the same from any path
    assert {s for s in before if before[s] != after[s]} == CODE_CHANGES[changed]


# --- precision ----------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    root = write_inputs(tmp_path)
    cfg = fanout_config(root, str(tmp_path / "store"))
    (corpus_manifest, _seeds) = data_task.fn(RunContext.of(cfg), read_inputs(cfg))
    ref = model_ref(cfg.model, ArtifactStore(cfg.store))
    return cfg, ref, corpus_manifest, hooked_layers(3, cfg.curate)


def test_gathered_activations_are_keyed_by_the_precision_their_shards_ran_in(corpus, monkeypatch):
    """A CPU driver (float32) gathers shards that a worker ran in bfloat16: the gathered key says bfloat16,
    so a later float32 run does not reuse it."""
    cfg, ref, records, layers = corpus
    rows = records.info["records"]
    bf16 = Precision(device="cpu", dtype="bfloat16")
    with monkeypatch.context() as worker:  # the worker's resolution: a GPU worker says bfloat16 for `auto`
        worker.setattr(tasks.context, "work_precision", lambda cfg: bf16)
        shard = activation_shard_task.fn(cfg.curate, RunContext.of(cfg), ref, records, layers, None, 0, rows)
    assert shard.info["precision"] == bf16.model_dump()
    gathered = gather_activations_task.fn(
        cfg.curate, RunContext.of(cfg), ref, records, layers, None, [shard], rows
    )  # on the driver
    assert (
        gathered.key
        == activations_key(cfg.curate, RunContext.of(cfg), ref.sha256, records.sha256, layers, None, bf16).key
    )
    assert (
        gathered.key
        != activations_key(cfg.curate, RunContext.of(cfg), ref.sha256, records.sha256, layers, None).key
    )  # float32 here
    stored = json.loads((Path(cfg.store) / "activations" / gathered.key / "_COMPLETE.json").read_text())
    assert "bfloat16" in json.dumps(stored)

    fp32_shard = activation_shard_task.fn(
        cfg.curate, RunContext.of(cfg), ref, records, layers, None, 0, rows
    )  # a float32 run
    assert not fp32_shard.cached and fp32_shard.key != shard.key
    with pytest.raises(ValueError, match="different precisions"):
        gather_activations_task.fn(
            cfg.curate, RunContext.of(cfg), ref, records, layers, None, [shard, fp32_shard], 2 * rows
        )


# --- Prefect's result key and long-lived processes ------------------------------------------------------


def _manifest(sha: str) -> StageManifest:
    return StageManifest(stage="curated", key="k", uri="u", sha256=sha, cached=True, seconds=0.0)


def test_prefects_result_key_holds_the_inputs_content():
    ctx = SimpleNamespace(
        task_run=SimpleNamespace(flow_run_id="flow", id="run", task_key="prune", dynamic_key="0")
    )

    def key(sha: str) -> str | None:
        return RUN_RESULTS.compute_key(ctx, {"cfg": BASE, "curated": [_manifest(sha)]}, {})

    with temporary_settings(updates={PREFECT_TASKS_DEFAULT_PERSIST_RESULT: True}):
        assert key("a") == key("a") and key("a") != key("b")  # a retry after an input changed recomputes
    assert model_task.cache_policy is NO_CACHE and inputs_task.cache_policy is NO_CACHE  # they read files


def test_a_long_lived_process_sees_a_changed_file_and_reloads_a_changed_model(tmp_path, monkeypatch):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"one")
    first = _file_digest(str(f))
    f.write_bytes(b"two!")
    assert _file_digest(str(f)) != first

    loads = []
    monkeypatch.setattr(
        tasks.models, "load_model", lambda path, **kw: loads.append(path) or (object(), object())
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cached_model(str(model), "cpu", "float32")
    cached_model(str(model), "cpu", "float32")
    assert len(loads) == 1
    (model / "config.json").write_text('{"changed": 1}')
    cached_model(str(model), "cpu", "float32")
    assert len(loads) == 2


def test_run_json_records_each_models_content_hash_or_hub_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from finescope_core.identity import hub_revision
    from tasks.export import model_identities

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    (tmp_path / "hub" / "models--org--teacher" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--teacher" / "refs" / "main").write_text("c" * 40)
    hub_revision.cache_clear()
    model = save_tiny(tmp_path / "model", "qwen3", hidden=48, layers=2, intermediate=96)
    cfg = BASE.model_copy(
        update={"model": str(model), "teacher": BASE.teacher.model_copy(update={"model": "org/teacher"})}
    )
    try:
        assert model_identities(cfg) == {
            "model": {"model": str(model), "sha256": model_digest(str(model))},
            "teacher.model": {"model": "org/teacher", "revision": "c" * 40},
        }
        (tmp_path / "hub" / "models--org--teacher" / "refs" / "main").write_text("d" * 40)
        before = model_digest(
            "org/teacher"
        )  # still "c": resolved once per process, one commit for a whole run
        hub_revision.cache_clear()
        assert model_digest("org/teacher") != before  # a new commit on the hub is a new model
    finally:
        hub_revision.cache_clear()

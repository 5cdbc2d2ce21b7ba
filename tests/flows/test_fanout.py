"""Fan-out: corpus shards and per-layer SAEs as mapped tasks, on threads and on a local Dask cluster.

Every split must give what the unsplit computation gives; the GPU tag limit must serialise tagged
tasks; Prefect's own results must land in the artifact store.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_curate_flow import TOPICS

from finescope_core.activations import load_activations
from finescope_core.config import ConfigError, FinescopeConfig
from finescope_core.store import ArtifactStore
from finescope_core.tiny import save_tiny
from flows.curate import curate_flow
from flows.runtime import results_location
from tasks.activations import activation_dirs, shard_plan
from tasks.sae import sae_groups


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("fanout"))


def write_inputs(root):
    """A tiny qwen3 model, 30 records of each topic, three multiplication seeds."""
    save_tiny(root / "model", "qwen3", hidden=48, layers=3, intermediate=96)
    corpus = [
        {"id": f"{t}-{i}", "text": tpl[i % 3].format(a=i, b=i * 7 % 13)}
        for t, tpl in TOPICS.items()
        for i in range(30)
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    seeds = [{"id": f"s{i}", "text": f"Compute {i} times 3."} for i in (4, 5, 6)]
    (root / "seeds.jsonl").write_text("\n".join(json.dumps(r) for r in seeds) + "\n")
    return root


def config(root: Path, store: str, **orchestration) -> FinescopeConfig:
    curate = dict(
        final_size=15,
        top_m=12,
        k_act=16,
        probes=1,
        reference_size=12,
        max_length=24,
        batch_size=8,
        shard_size=orchestration.pop("shard_size", 4096),
        sae={"d_sae": 48, "steps": 25, "batch_size": 16},
    )
    return FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=store,
        device="cpu",
        curate=curate,
        orchestration=orchestration,
    )


def curated_ids(cfg: FinescopeConfig, result) -> list[str]:
    path = Path(cfg.store) / "curated" / result.curated.key / "curated.jsonl"
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def sae_tensors(cfg: FinescopeConfig, result) -> dict[str, torch.Tensor]:
    root = Path(cfg.store) / "sae" / result.sae.key
    return {
        f"{d.name}/{k}": v
        for d in sorted(root.glob("layer_*"))
        for k, v in load_file(d / "sae.safetensors").items()
    }


@pytest.fixture(scope="module")
def reference(inputs):
    """One shard, all SAE layers in one task: what every other split must reproduce."""
    cfg = config(inputs, str(inputs / "store-ref"), shard_size=4096, sae_layers_per_task=3)
    return cfg, curate_flow(cfg)


def test_plans_cover_every_row_and_layer_once():
    assert shard_plan(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_plan(8, 8) == [(0, 8)]
    assert sae_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert sae_groups(3, 1) == [[0], [1], [2]]


def test_sharded_embedding_and_per_layer_saes_match_the_unsplit_run(inputs, reference):
    ref_cfg, ref = reference
    cfg = config(inputs, str(inputs / "store-split"), shard_size=16, sae_layers_per_task=1, workers=3)
    result = curate_flow(cfg)
    store = Path(cfg.store)
    assert len(list((store / "activation-shards").iterdir())) == 4 + 1  # 60 corpus rows / 16, and the seeds
    assert len(list((store / "sae-layers").iterdir())) == 3
    split_acts = load_activations(activation_dirs(ArtifactStore(cfg.store), result.activations))
    whole_acts = load_activations(activation_dirs(ArtifactStore(ref_cfg.store), ref.activations))
    assert split_acts.shape == whole_acts.shape == (60, 3, 16)
    torch.testing.assert_close(split_acts, whole_acts, rtol=1e-5, atol=1e-5)
    # Same input activations: the per-layer SAEs equal the batched ones, so the curated set is the same.
    torch.testing.assert_close(sae_tensors(cfg, result), sae_tensors(ref_cfg, ref), rtol=1e-4, atol=1e-5)
    fvu = [m["fvu"] for m in result.sae.info["metrics"]]
    assert fvu == pytest.approx([m["fvu"] for m in ref.sae.info["metrics"]], rel=1e-4)
    assert curated_ids(cfg, result) == curated_ids(ref_cfg, ref)


def test_a_deleted_shard_is_recomputed_alone(inputs):
    cfg = config(inputs, str(inputs / "store-resume"), shard_size=16)
    first = curate_flow(cfg)
    shards = Path(cfg.store) / "activation-shards"
    marks = {d.name: (d / "_COMPLETE.json").stat().st_mtime_ns for d in shards.iterdir()}
    victim = json.loads(
        (Path(cfg.store) / "activations" / first.activations.key / "shards.json").read_text()
    )[2]["key"]
    for f in (shards / victim).iterdir():
        f.unlink()
    (shards / victim).rmdir()
    again = curate_flow(cfg)
    after = {d.name: (d / "_COMPLETE.json").stat().st_mtime_ns for d in shards.iterdir()}
    assert after.keys() == marks.keys()
    assert [k for k in marks if after[k] != marks[k]] == [victim]
    assert curated_ids(cfg, again) == curated_ids(cfg, first)


def test_gpu_tag_limit_runs_tagged_tasks_one_at_a_time(inputs, tmp_path, monkeypatch):
    """Per-layer SAE tasks (tagged finescope-gpu) overlap on 4 threads, unless the tag limit is 1."""
    from prefect import get_client

    import finescope_core.curate.sae as sae_stage

    intervals: list[tuple[float, float]] = []
    started: list[float] = []
    wait_for_all = True
    train = sae_stage.sae_stage

    def timed_training(*args, **kwargs):
        begin = time.monotonic()
        started.append(begin)
        if wait_for_all:  # the control run: hold each task until all 3 have started (or 20 s)
            while len(started) < 3 and time.monotonic() < begin + 20:
                time.sleep(0.05)
        else:  # long enough for another thread to start its task, if the limit let it
            time.sleep(1.5)
        out = train(*args, **kwargs)
        intervals.append((begin, time.monotonic()))
        return out

    monkeypatch.setattr(sae_stage, "sae_stage", timed_training)

    def overlaps() -> int:
        spans = sorted(intervals)
        return sum(after[0] < before[1] for before, after in zip(spans, spans[1:], strict=False))

    curate_flow(config(inputs, str(tmp_path / "free"), workers=4, persist_results=False))
    assert len(intervals) == 3 and overlaps() > 0  # the control: without a limit they do run together

    intervals.clear()
    started.clear()
    wait_for_all = False
    time.sleep(5.5)  # Prefect caches "this tag has no limit" for 5 s per process
    try:
        curate_flow(
            config(inputs, str(tmp_path / "limited"), workers=4, gpu_concurrency=1, persist_results=False)
        )
        with get_client(sync_client=True) as client:
            assert client.read_concurrency_limit_by_tag("finescope-gpu").concurrency_limit == 1
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag("finescope-gpu")
    assert len(intervals) == 3 and overlaps() == 0


def test_task_results_are_json_outside_the_store_and_read_back(inputs, tmp_path):
    """Prefect's task results are JSON records (nothing pickled), kept outside the artifact store, and a
    retried flow run's cache lookup (a ResultStore read of the task run's key) returns the manifest."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    cfg = config(inputs, str(tmp_path / "store"))
    started = time.time()
    result = curate_flow(cfg)
    results_dir = Path(results_location(cfg))
    assert tmp_path / "store" not in results_dir.parents
    assert not (tmp_path / "store" / "prefect-results").exists()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="curated")),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    run = max(
        (r for r in runs if r.start_time and r.start_time.timestamp() >= started - 1),
        key=lambda r: r.start_time,
    )
    files = [f for f in results_dir.iterdir() if f.is_file()]
    key = Path(run.state.data.storage_key).name  # the file a retry's cache lookup reads
    assert (results_dir / key) in files
    for f in files:  # task records, and the subflows' own results
        record = json.loads(f.read_bytes())  # JSON, not a base64 cloudpickle
        if isinstance(record, dict) and "metadata" in record:
            assert record["metadata"]["serializer"]["type"] == "json", f
    retried = ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir)))
    back = retried.read(key).result
    # As JSON, like a manifest the store serves on a cache hit (integer dict keys become strings).
    assert back.model_dump() == json.loads(result.curated.model_dump_json())
    assert run.state.result().model_dump() == back.model_dump()
    # The corpus itself (the inputs task's value) is never persisted.
    assert sum(f.stat().st_size for f in files) < 200_000

    off = config(inputs, str(tmp_path / "store-off"), persist_results=False)
    curate_flow(off)
    assert not Path(results_location(off)).exists()


def test_dask_cluster_runs_shards_on_both_workers(inputs, reference):
    distributed = pytest.importorskip("distributed")
    ref_cfg, ref = reference
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
            cfg = config(
                inputs,
                str(inputs / "store-dask"),
                shard_size=16,
                task_runner="dask",
                address=cluster.scheduler_address,
            )
            result = curate_flow(cfg)
        workers = {t["worker"] for t in stream.data}
    assert len(workers) == 2, f"tasks ran on {workers}"
    assert curated_ids(cfg, result) == curated_ids(ref_cfg, ref)


def test_dask_runner_starts_and_stops_its_own_cluster(inputs, reference):
    pytest.importorskip("prefect_dask")
    import psutil

    ref_cfg, ref = reference
    cfg = config(inputs, str(inputs / "store-dask-own"), shard_size=32, task_runner="dask", workers=2)
    result = curate_flow(cfg)
    assert curated_ids(cfg, result) == curated_ids(ref_cfg, ref)
    time.sleep(1)
    leftover = [
        p for p in psutil.Process().children(recursive=True) if "distributed" in " ".join(p.cmdline())
    ]
    assert not leftover, f"dask processes left running: {leftover}"


def test_ray_runner_gives_the_same_curated_set(inputs, reference):
    """The optional Ray runner (`pip install finescope[ray]`): a local Ray instance started for the run."""
    pytest.importorskip("prefect_ray", reason="the Ray runner is optional: pip install finescope[ray]")
    ref_cfg, ref = reference
    cfg = config(inputs, str(inputs / "store-ray"), shard_size=32, task_runner="ray", workers=2)
    result = curate_flow(cfg)
    assert curated_ids(cfg, result) == curated_ids(ref_cfg, ref)
    assert len(list((Path(cfg.store) / "activation-shards").iterdir())) == 2 + 1


def _dask_worker(address: str, name: str, *resources: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        address,
        "--nthreads",
        "1",
        "--name",
        name,
        "--no-dashboard",
        "--death-timeout",
        "60",
        *resources,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_gpu_workers_run_every_gpu_task_on_a_worker_with_the_gpu_resource(inputs, reference):
    """`orchestration.gpu_workers`: on a cluster of two GPU workers and one plain worker, the GPU-tagged
    tasks (embedding shards, SAE layers, code shards) run only where the `GPU` resource is; the
    curated set is the same. (The resource is a label: the test runs on CPU workers.)"""
    distributed = pytest.importorskip("distributed")
    ref_cfg, ref = reference
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        gpus = [_dask_worker(cluster.scheduler_address, f"gpu-{i}", "--resources", "GPU=1") for i in range(2)]
        try:
            with distributed.Client(cluster) as client:
                client.wait_for_workers(3, timeout=120)
                names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
                with distributed.get_task_stream(client) as stream:
                    cfg = config(
                        inputs,
                        str(inputs / "store-gpu-workers"),
                        shard_size=16,
                        task_runner="dask",
                        address=cluster.scheduler_address,
                        gpu_workers=True,
                    )
                    result = curate_flow(cfg)
        finally:
            for p in gpus:
                p.terminate()
                p.wait(timeout=30)
    ran = {names.get(t["worker"], t["worker"]) for t in stream.data}
    assert ran == {"gpu-0", "gpu-1"}, f"GPU tasks ran on {ran}"
    assert curated_ids(cfg, result) == curated_ids(ref_cfg, ref)


def test_gpu_workers_need_dask_and_a_visible_gpu(inputs):
    from flows.runtime import check_runner, task_runner

    with pytest.raises(ConfigError, match="orchestration.gpu_workers places tasks by Dask worker resources"):
        check_runner(config(inputs, "store", gpu_workers=True))  # preflight: before any work
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            task_runner(config(inputs, "store", task_runner="dask", gpu_workers=True))

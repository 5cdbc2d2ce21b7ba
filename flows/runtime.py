"""Where a run's work goes: the task runner of fanned-out stages, the GPU concurrency limit, and the
Prefect result storage (JSON, on this machine). All chosen by `config.orchestration`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prefect.context import FlowRunContext
from prefect.serializers import JSONSerializer
from prefect.settings import PREFECT_TASKS_DEFAULT_PERSIST_RESULT, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from finescope_core.config import ConfigError, FinescopeConfig
from flows import server_guard
from tasks.context import logger
from tasks.retries import GPU_TAGS

# Every flow imports this module: a temporary Prefect API started by this process (no PREFECT_API_URL)
# then ends with it, even after a SIGKILL (flows/server_guard.py).
server_guard.install()

_RUNNER_PACKAGES = {"dask": ("prefect_dask", "prefect-dask"), "ray": ("prefect_ray", "finescope[ray]")}


def check_runner(cfg: FinescopeConfig) -> None:
    """Refuse a runner whose integration is not installed, before any work."""
    name = cfg.orchestration.task_runner
    if cfg.orchestration.gpu_workers and name != "dask":
        raise ConfigError(
            f"orchestration.gpu_workers places tasks by Dask worker resources; set "
            f"orchestration.task_runner: dask (it is {name!r}) or gpu_workers: false"
        )
    if name in _RUNNER_PACKAGES:
        module, package = _RUNNER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"orchestration.task_runner={name!r} needs the {module} package; `pip install {package}`, "
                "or set orchestration.task_runner: threads"
            )


def task_runner(cfg: FinescopeConfig) -> TaskRunner[Any]:
    """The runner of the fanned-out stages (corpus shards, per-layer SAEs)."""
    o = cfg.orchestration
    check_runner(cfg)
    if o.task_runner == "dask":
        # prefect_dask re-exports DaskTaskRunner without listing it in __all__
        from prefect_dask import DaskTaskRunner  # type: ignore[attr-defined]

        if o.address:
            return DaskTaskRunner(address=o.address)
        # One single-threaded worker process per slot: torch inside each task uses its own threads.
        cluster: dict[str, Any] = {
            "n_workers": o.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
        }
        if o.gpu_workers:
            gpus = torch.cuda.device_count()
            if gpus == 0:
                raise ConfigError(
                    "orchestration.gpu_workers starts one Dask worker per GPU, and no CUDA device is "
                    "visible; set gpu_workers: false, or give an address of a cluster with GPU workers"
                )
            cluster.update(n_workers=gpus, resources={"GPU": 1})
        return DaskTaskRunner(cluster_kwargs=cluster)
    if o.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        ray: TaskRunner[Any] = (
            RayTaskRunner(address=o.address)
            if o.address
            else RayTaskRunner(init_kwargs={"num_cpus": o.workers, "include_dashboard": False})
        )
        return ray
    return ThreadPoolTaskRunner(max_workers=o.workers)


def apply_gpu_limit(cfg: FinescopeConfig) -> None:
    """Set the server's concurrency limit on the GPU tag (shared by every run), when configured.

    A process that ran tagged tasks in the last 5 s while no limit existed keeps ignoring the new
    limit for up to those 5 s (Prefect caches the absence of a limit); a fresh run is not affected.
    """
    limit = cfg.orchestration.gpu_concurrency
    if limit is None:
        return
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for tag in GPU_TAGS:
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
    logger().info("at most %d tasks tagged %s run at once", limit, ", ".join(GPU_TAGS))


def results_location(cfg: FinescopeConfig) -> str:
    """Where Prefect's persisted task results go: Prefect's local storage of this machine and user
    (`PREFECT_LOCAL_STORAGE_PATH`, default `~/.prefect/storage`), under `finescope/<hash of the store URI>`.

    Never inside the artifact store: Prefect reads a result back with the serializer its file names, so
    a result file in a store that others can write to could make every run unpickle their code.
    """
    from prefect.settings import get_current_settings

    root = Path(get_current_settings().results.local_storage_path).expanduser().resolve()
    return str(root / "finescope" / hashlib.sha256(cfg.store.encode()).hexdigest()[:12])


def result_storage(cfg: FinescopeConfig) -> Any:
    """A saved filesystem block for `results_location(cfg)` (Prefect needs a saved block to share it
    with task-runner processes)."""
    from prefect.filesystems import LocalFileSystem

    location = results_location(cfg)
    block = LocalFileSystem(basepath=location)
    block.save("finescope-results-" + hashlib.sha256(location.encode()).hexdigest()[:12], overwrite=True)
    return block


@contextlib.contextmanager
def prefect_results(cfg: FinescopeConfig) -> Iterator[None]:
    """Within the block, the current flow run's task results (the stages' manifests) are persisted as JSON
    to `results_location(cfg)`, so the UI and a retried flow run read them back.

    A flow's result storage is fixed when it is decorated, but ours comes from the run's config, so
    the run context is re-entered with a result store on the saved block (subflows inherit it). JSON,
    not Prefect's default cloudpickle: a result is data (a pydantic manifest), and nothing is pickled.
    """
    ctx = FlowRunContext.get()
    if ctx is None or not cfg.orchestration.persist_results:
        yield
        return
    update = {"result_storage": result_storage(cfg), "serializer": JSONSerializer()}
    store = ctx.result_store.model_copy(update=update)
    # Tasks decide persistence from their own option or this setting, not from the flow run.
    with (
        temporary_settings(updates={PREFECT_TASKS_DEFAULT_PERSIST_RESULT: True}),
        ctx.model_copy(update={"result_store": store, "persist_result": True}),
    ):
        yield


@contextlib.contextmanager
def gpu_placement(cfg: FinescopeConfig) -> Iterator[None]:
    """Around the `.map` of GPU-tagged tasks: with `orchestration.gpu_workers` they need the Dask worker
    resource `GPU=1` (one per GPU worker, so one such task per GPU at a time)."""
    if cfg.orchestration.gpu_workers:
        import dask

        # dask re-exports `annotate` without listing it in __all__
        with dask.annotate(resources={"GPU": 1}):  # type: ignore[attr-defined]
            yield
    else:
        yield

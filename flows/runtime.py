"""Where a run's work goes: the task runner of fanned-out stages, the GPU concurrency limit, and the
Prefect result storage in the artifact store. All chosen by `config.orchestration`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_TASKS_DEFAULT_PERSIST_RESULT, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from finescope_core.config import ConfigError, FinescopeConfig
from finescope_core.store_admin import RESULTS_DIR
from flows import server_guard
from tasks.common import GPU_TAGS, logger, storage_options

# Every flow imports this module: a temporary Prefect API started by this process (no PREFECT_API_URL)
# then ends with it, even after a SIGKILL (flows/server_guard.py).
server_guard.install()

_RUNNER_PACKAGES = {"dask": ("prefect_dask", "prefect-dask"), "ray": ("prefect_ray", "finescope[ray]")}


def check_runner(cfg: FinescopeConfig) -> None:
    """Refuse a runner whose integration is not installed, before any work."""
    name = cfg.orchestration.task_runner
    if cfg.orchestration.gpu_workers and name != "dask":
        raise ConfigError(f"orchestration.gpu_workers places tasks by Dask worker resources; set "
                          f"orchestration.task_runner: dask (it is {name!r}) or gpu_workers: false")  # fmt: skip
    if name in _RUNNER_PACKAGES:
        module, package = _RUNNER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"orchestration.task_runner={name!r} needs the {module} package; `pip install {package}`, "
                "or set orchestration.task_runner: threads"
            )


def task_runner(cfg: FinescopeConfig) -> TaskRunner:
    """The runner of the fanned-out stages (corpus shards, per-layer SAEs)."""
    o = cfg.orchestration
    check_runner(cfg)
    if o.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if o.address:
            return DaskTaskRunner(address=o.address)
        # One single-threaded worker process per slot: torch inside each task uses its own threads.
        cluster: dict[str, Any] = {"n_workers": o.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
        if o.gpu_workers:
            gpus = torch.cuda.device_count()
            if gpus == 0:
                raise ConfigError("orchestration.gpu_workers starts one Dask worker per GPU, and no CUDA device is visible; "
                                  "set gpu_workers: false, or give an address of a cluster with GPU workers")  # fmt: skip
            cluster.update(n_workers=gpus, resources={"GPU": 1})
        return DaskTaskRunner(cluster_kwargs=cluster)
    if o.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        if o.address:
            return RayTaskRunner(address=o.address)
        return RayTaskRunner(init_kwargs={"num_cpus": o.workers, "include_dashboard": False})
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
    """Where Prefect's persisted results go: `<store>/prefect-results`."""
    store = cfg.store.rstrip("/")
    return f"{store}/{RESULTS_DIR}" if "://" in store else os.path.join(os.path.abspath(store), RESULTS_DIR)


def result_storage(cfg: FinescopeConfig) -> Any:
    """A saved filesystem block for `<store>/prefect-results` (Prefect needs a saved block to share it).

    The block holds the endpoint and region only: credentials never go into the Prefect database
    (`prefect_results` hands a Secret block's ones to the process environment for the run instead).
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    location = results_location(cfg)
    name = "finescope-results-" + hashlib.sha256(location.encode()).hexdigest()[:12]
    if "://" in location and not location.startswith("file://"):
        settings: dict[str, Any] = {}
        client = cfg.storage.fsspec_options().get("client_kwargs", {})
        if client:
            settings["client_kwargs"] = client
        block: Any = RemoteFileSystem(basepath=location, settings=settings)
    else:
        block = LocalFileSystem(basepath=location.removeprefix("file://"))
    block.save(name, overwrite=True)
    return block


@contextlib.contextmanager
def _credentials_in_environment(cfg: FinescopeConfig) -> Iterator[None]:
    """Credentials from `storage.secret_block` reach Prefect's result writes through the AWS variables.

    Only while the run's tasks execute, and never over variables the environment already sets.
    """
    options = storage_options(cfg)
    added = {}
    for name, option in (("AWS_ACCESS_KEY_ID", "key"), ("AWS_SECRET_ACCESS_KEY", "secret")):
        if option in options and name not in os.environ:
            added[name] = options[option]
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def prefect_results(cfg: FinescopeConfig) -> Iterator[None]:
    """Within the block, the current flow run's task results are persisted to `<store>/prefect-results`.

    A flow's result storage is fixed when it is decorated, but ours comes from the run's config, so
    the run context is re-entered with a result store on the saved block (subflows inherit it).
    """
    ctx = FlowRunContext.get()
    if ctx is None or not cfg.orchestration.persist_results:
        yield
        return
    store = ctx.result_store.model_copy(update={"result_storage": result_storage(cfg)})
    # Tasks decide persistence from their own option or this setting, not from the flow run.
    with (
        _credentials_in_environment(cfg),
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

        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield


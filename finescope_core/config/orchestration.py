"""The `orchestration` section: how a run is spread over workers, and Prefect's own results."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finescope_core.config.base import Strict


class OrchestrationConfig(Strict):
    """How a run is spread over workers and where Prefect keeps its own results."""

    task_runner: Literal["threads", "dask", "ray"] = "threads"
    """Runner of the fanned-out stages (corpus shards, per-layer SAEs). `threads`: in this process;
    `dask`: a Dask cluster through prefect-dask; `ray`: a Ray cluster through prefect-ray
    (`pip install finescope[ray]`)."""
    address: str | None = None
    """Scheduler of an existing cluster (`tcp://host:8786` for Dask, `ray://host:10001` for Ray).
    None: start a local cluster for the run and stop it afterwards."""
    workers: int = Field(2, ge=1)
    """Threads (`threads`) or worker processes of the local cluster (`dask`, `ray`)."""
    gpu_concurrency: int | None = Field(None, ge=1)
    """At most this many tasks tagged `finescope-gpu` run at once, across every run on the Prefect
    server (a tag concurrency limit, set when the run starts). None: leave the server's limit as it is."""
    gpu_workers: bool = False
    """`dask` only: one worker per GPU. The GPU-tagged fanned-out tasks (embedding shards, SAE layer
    groups, code shards) ask for the Dask worker resource `GPU=1`, so they run only on workers that
    have it, one at a time each. A local cluster then starts one single-threaded worker per visible
    CUDA device (`workers` is ignored), each using its own device; on an existing cluster (`address`)
    start one worker per GPU with that resource, e.g. `CUDA_VISIBLE_DEVICES=0 dask worker ADDR
    --nthreads 1 --resources GPU=1` (the CUDA image does, see README)."""
    sae_layers_per_task: int = Field(1, ge=1)
    """Hooked layers trained together in one SAE task (one task per layer fans out the most; a
    larger value batches layers on one device). The SAEs are the same either way."""
    persist_results: bool = True
    """Persist Prefect task results as JSON in Prefect's local storage of the machine that runs the flow
    (never in the shared store: see README, security note), so the UI and reruns can read them back."""

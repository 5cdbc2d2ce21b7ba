"""The cached-stage runner: a stage's artifact from the store when committed and sound, else built and
committed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.settings import get_current_settings
from pydantic import BaseModel

from finescope_core import __version__
from finescope_core.memory import build_releasing
from finescope_core.store import (
    Artifact,
    ArtifactStore,
    DamagedArtifact,
)
from tasks.context import logger
from tasks.identity import inputs_digest
from tasks.keymodels import StageKey
from tasks.planning import Planner, current_planner, first_blocker

CODE_VERSION = __version__


@dataclass
class RunResults(CachePolicy):
    """Prefect cache policy of every stage task: its result is persisted only when the run asks for it.

    The stage cache proper is `run_cached` (content-addressed, in the artifact store). This policy
    gives Prefect a storage key per task run, so that with `orchestration.persist_results` its result
    is written to the run's result storage (JSON on this machine, see `flows.runtime`) and a retried flow
    run reads it
    back instead of re-running the task. Without it, no key: nothing is written.

    The key holds the task's inputs by content (`inputs_digest`: a manifest by its artifact's hash), so
    a retry after an input changed upstream computes the task again instead of returning the first
    attempt's manifest. Tasks that read files or models named by the config (`inputs`, `model`) use no
    cache: a retry re-reads them.
    """

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if task_ctx is None or get_current_settings().tasks.default_persist_result is not True:
            return None
        run = task_ctx.task_run
        return f"{run.flow_run_id or run.id}-{run.task_key}-{run.dynamic_key}-{inputs_digest(inputs)}"


RUN_RESULTS = RunResults()


class StageManifest(BaseModel):
    """What a task returns: where its artifact is and how to recognise it. Never tensors or models."""

    stage: str
    key: str
    uri: str
    sha256: str
    cached: bool
    seconds: float
    info: dict[str, Any] = {}


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{CODE_VERSION}+{sha}" if sha else CODE_VERSION


def run_cached(
    store: ArtifactStore, spec: StageKey, build: Callable[[Path], dict[str, Any]], *, resume: bool = False
) -> StageManifest:
    """Return the stored artifact for this stage key or build, commit and return it.

    The key is content-addressed, so a re-run with the same inputs recomputes nothing. A stored
    artifact is checked against its marker before reuse; a deleted or damaged one is a miss, rebuilt
    with a warning. With `resume`, files a killed run left in the stage's work dir are kept for
    `build` to continue from. A run that finds another building the same key waits for it and then
    reuses its artifact.
    """
    planner = current_planner()
    if planner is not None:  # a dry run (`finescope store plan`): look up, never build
        return _planned(planner, store, spec)
    stage, key = spec.stage, spec.key
    found = _reusable(store, spec, warn=True)
    if found is not None:
        logger().info("%s: cached (%s)", stage, found.uri)
        return _manifest(found, cached=True, seconds=0.0)
    start = time.perf_counter()
    # The work dir outlives a killed run, so a resumable stage (teacher generation) picks up where it stopped.
    with store.work_dir(stage, key, resume=resume) as work:
        found = _reusable(store, spec, warn=False)  # committed by a run this one waited for
        if found is not None:
            logger().info("%s: cached, committed by a concurrent run (%s)", stage, found.uri)
            return _manifest(found, cached=True, seconds=0.0)
        info = build_releasing(stage, build, work)
        seconds = time.perf_counter() - start
        record = {
            "version": spec.version,
            "code_version": CODE_VERSION,
            "config": spec.config,
            "inputs": spec.inputs,
            "info": info,
            "seconds": seconds,
        }
        artifact = store.commit(work, stage, key, record)
    logger().info("%s: done in %.1fs (%s)", stage, seconds, artifact.uri)
    return _manifest(artifact, cached=False, seconds=seconds)


def _reusable(store: ArtifactStore, spec: StageKey, *, warn: bool) -> Artifact | None:
    """The committed artifact of `spec` if its files are as recorded; a damaged one is a miss."""
    found = store.lookup(spec.stage, spec.key)
    if found is None:
        return None
    problems = store.verify(found)
    if not problems:
        return found
    if warn:
        logger().warning("%s: %s; recomputing it", spec.stage, store.damage_message(found, problems))
    return None


class PendingManifest(StageManifest):
    """In a dry run: the manifest of a stage to compute (its key is known, its content not yet)."""

    pending: str
    """The plan row that computes it: what every stage reading it waits for."""

    @classmethod
    def of(cls, stage: str, pending: str, key: str = "", uri: str = "") -> PendingManifest:
        return cls(stage=stage, key=key, uri=uri, sha256="", cached=False, seconds=0.0, pending=pending)


def planned_row(
    planner: Planner, name: str, stage: str, spec: StageKey | None, found: StageManifest | None
) -> StageManifest:
    """Record a looked-up stage's row (`reuse` or `compute`); hand on its manifest, or what waits for it.
    `spec` None: a stage of parts with no gathered key (the corpus's codes)."""
    key = spec.key if spec is not None else None
    planner.row(name, stage, "reuse" if found is not None else "compute", key)
    if found is not None:
        return found
    uri = planner.store.artifact_uri(stage, key) if key is not None else ""
    return PendingManifest.of(stage, name, key or "", uri)


def _planned(planner: Planner, store: ArtifactStore, spec: StageKey) -> StageManifest:
    return planned_row(planner, planner.label or spec.stage, spec.stage, spec, lookup_stage(store, spec))


def planned_after(stage: str, *inputs: Any, name: str | None = None) -> StageManifest | None:
    """In a dry run, when one of `inputs` (looked up inside a task, e.g. the sentence embeddings the
    retrieval reads) is still to compute: the pending manifest of `stage`, planned after it (row `name`,
    else the current label). Else None."""
    planner = current_planner()
    waiting = first_blocker(*inputs) if planner is not None else None
    if planner is None or waiting is None:
        return None
    planner.row(name or planner.label or stage, stage, "after", after=waiting)
    return PendingManifest.of(stage, waiting)  # what waits for it waits for the same first stage


def lookup_stage(store: ArtifactStore, spec: StageKey) -> StageManifest | None:
    """The committed artifact `run_cached` would return for this key, or None; builds nothing."""
    found = _reusable(store, spec, warn=False)
    return None if found is None else _manifest(found, cached=True, seconds=0.0)


def _manifest(artifact: Artifact, *, cached: bool, seconds: float) -> StageManifest:
    return StageManifest(
        stage=artifact.stage,
        key=artifact.key,
        uri=artifact.uri,
        sha256=artifact.sha256,
        cached=cached,
        seconds=artifact.manifest.get("seconds", seconds) if cached else seconds,
        info=artifact.manifest.get("info", {}),
    )


def artifact_dir(store: ArtifactStore, manifest: StageManifest) -> Path:
    """A local directory with the files of a committed stage (downloaded when the store is remote),
    checked against its marker: a damaged artifact raises `DamagedArtifact`, never reaches a caller."""
    found = store.lookup(manifest.stage, manifest.key)
    if found is None:
        raise FileNotFoundError(
            f"{manifest.uri} disappeared from the store during the run; re-run to rebuild it"
        )
    if found.sha256 != manifest.sha256:  # what was read is not what the keys below were computed from
        raise DamagedArtifact(
            f"{manifest.uri} was replaced by different content during the run; re-run to use it"
        )
    return store.local_path(found)

"""The one shape of a stage's core entry: `run(inputs, section, ctx, work_dir, progress) -> info`.

Every stage of the pipeline has one such function in its core module (`finescope_core/<stage>`):

- `inputs`: a frozen dataclass of that module (`PruneInputs`, `TuneInputs`, ...) holding what the
  stage reads, already resolved to local paths and plain values (an upstream artifact's directory,
  the model's path, the records);
- `section`: the stage's own config section (`PruneConfig`, `FinetuneConfig`, ...), never the whole
  configuration;
- `ctx`: the `StageContext` below: where and how the work runs;
- `work_dir`: an empty directory the stage writes its artifact files into (the store commits it);
- `progress`: called after each batch or step (`finescope_core.progress.Progress`).

It returns the stage's `info`: a small JSON-able dict of what it measured, kept in the manifest.
The orchestration layer (`tasks/`) resolves inputs, keys and the store; the core never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage's work runs: resolved once where the work runs, the same for every stage."""

    device: str
    """The torch device the work runs on (`cpu`, `cuda`, `cuda:1`, `mps`)."""
    dtype: str
    """The resolved dtype name of model work (`float32`, `bfloat16`, `float16`)."""
    seed: int
    """The run's seed: every sample, split and initialisation derives from it."""
    run: str = "finescope"
    """The run's name (model cards, log lines)."""

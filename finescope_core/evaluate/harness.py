"""lm-evaluation-harness tasks on an in-memory model: the ecosystem's numbers, with our own bootstrap CIs.

`harness_metrics` wraps the model the evaluate stage already loaded in lm-eval's `HFLM` (no re-load),
runs each task through `lm_eval.simple_evaluate` with lm-eval's per-sample log (`log_samples=True`),
and returns, per task and metric, lm-eval's value and stderr beside `n` and a seeded 95 % percentile
bootstrap CI that we compute from the per-sample values. Tasks come from a directory of task YAMLs
(`evaluate.lm_eval_include`) over local data files, so nothing is fetched from a hub; without one,
lm-eval's stock tasks are visible (they need the hub or a filled HF datasets cache).

lm_eval is imported inside the functions: importing it costs seconds, and runs that set no
`evaluate.lm_eval_tasks` never pay for it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from finescope_core.config import EvalConfig
from finescope_core.evaluate.bootstrap import mean_interval
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE, model_device
from finescope_core.progress import Progress, no_progress

BOOTSTRAP_RESAMPLES = EvalConfig.model_fields["bootstrap_resamples"].default
"""Resamples of our percentile bootstrap when no config says (`evaluate.bootstrap_resamples`); lm-eval's
own stderr uses its `bootstrap_iters` separately."""
_LM_EVAL_BOOTSTRAP_ITERS = 1000
"""lm-eval's bootstrap for the stderr of non-mean aggregations (its default, 100000, takes minutes)."""


CHAT_SUFFIX = "@chat"
"""Appended to a task's name for its run with the chat template (`evaluate.lm_eval_chat_template: both`)."""


def harness_runs(cfg: EvalConfig) -> list[tuple[str, str, bool]]:
    """(label, lm-eval task, with the chat template) of every run `cfg` asks for, in order: each task
    plain and/or with the chat template (`evaluate.lm_eval_chat_template`); with `both`, the chat run
    of a task is labelled `<task>@chat`."""
    mode = cfg.lm_eval_chat_template
    runs: list[tuple[str, str, bool]] = []
    for task in cfg.lm_eval_tasks:
        if mode == "on":
            runs.append((task, task, True))
            continue
        runs.append((task, task, False))
        if mode == "both":
            runs.append((task + CHAT_SUFFIX, task, True))
    return runs


def harness_limit(cfg: EvalConfig) -> int:
    """Examples per task: `evaluate.lm_eval_limit`, or `evaluate.max_examples` when it is None."""
    return cfg.lm_eval_limit if cfg.lm_eval_limit is not None else cfg.max_examples


def _task_manager(include: str | None) -> Any:
    """lm-eval's task index: only the YAMLs under `include`, or lm-eval's stock tasks without it."""
    from lm_eval.tasks import TaskManager

    if include is None:
        return TaskManager()
    return TaskManager(include_path=str(include), include_defaults=False)


def check_harness_config(cfg: EvalConfig) -> Any:
    """Refuse a bad lm-eval setup before any model work: a missing include directory, an unknown task.

    Returns:
        The lm-eval `TaskManager` that resolves the tasks (None when `lm_eval_tasks` is empty).

    Raises:
        EvalError: naming `evaluate.lm_eval_include` / `evaluate.lm_eval_tasks` and the fix.
    """
    if not cfg.lm_eval_tasks:
        return None
    include = cfg.lm_eval_include
    if include is not None:
        if "://" in include:
            raise EvalError(
                f"evaluate.lm_eval_include: {include!r} is a URI; lm-eval reads task YAMLs from a local "
                "directory, so copy them to one and name it"
            )
        if not Path(include).is_dir():
            raise EvalError(
                f"evaluate.lm_eval_include: {include} is not a directory; point it at the directory that "
                "holds your lm-eval task YAMLs (relative paths resolve against the config file), or leave "
                "it out to use lm-eval's stock tasks"
            )
    manager = _task_manager(include)
    known = set(manager.all_tasks)
    unknown = [name for name in cfg.lm_eval_tasks if name not in known]
    if unknown:
        where = f"in {include}" if include is not None else "among lm-eval's stock tasks"
        hint = sorted(known)[:10] if include is not None else "run `lm_eval ls tasks`"
        raise EvalError(
            f"evaluate.lm_eval_tasks: {unknown} not found {where}; use the `task:` names of the YAMLs "
            f"(found: {hint}), or set evaluate.lm_eval_include to the directory that defines them"
        )
    return manager


def _yaml_data_files(doc: Any) -> list[str]:
    """Local paths named by a task YAML's `dataset_kwargs.data_files` (a string, list or split mapping)."""
    if not isinstance(doc, dict):
        return []
    kwargs = doc.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    values = list(files.values()) if isinstance(files, dict) else [files]
    out: list[str] = []
    for value in values:
        out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return out


class _LenientLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs, whose `!function` tags a plain safe loader refuses, without running them."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)  # type: ignore[no-untyped-call]  # untyped in types-PyYAML


def harness_include_sha(include: str | None) -> str | None:
    """Content hash of the include directory: every file under it, plus local data files its YAMLs name
    outside it (so an edited task YAML or data file never serves a stale evaluation).

    Returns:
        A sha256 hex digest, or None without an include directory.
    """
    if include is None:
        return None
    root = Path(include)
    if not root.is_dir():
        return hashlib.sha256(f"missing:{include}".encode()).hexdigest()
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    extra: set[Path] = set()
    for path in files:
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        data = path.read_bytes()
        h.update(hashlib.sha256(data).digest())
        if path.suffix in (".yaml", ".yml"):
            try:
                doc = yaml.load(data, Loader=_LenientLoader)  # noqa: S506  # a SafeLoader subclass
            except yaml.YAMLError:
                continue
            for name in _yaml_data_files(doc):
                p = Path(name) if Path(name).is_absolute() else path.parent / name
                if p.is_file() and root.resolve() not in p.resolve().parents:
                    extra.add(p.resolve())
    for path in sorted(extra):
        h.update(f"{path}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def bootstrap_ci(
    values: Sequence[float], *, seed: int, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of the mean of per-sample values, seeded (`bootstrap.mean_interval`:
    the same resampling as every other metric's interval, widened to contain the mean itself).

    Raises:
        EvalError: no values.
    """
    if not values:
        raise EvalError("no per-sample values to bootstrap")
    interval = mean_interval(values, resamples=resamples, seed=seed)
    return interval.low, interval.high


def _number(value: Any) -> float | None:
    """A finite float from a per-sample metric value (bools and numpy scalars included), else None."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def _numeric_metrics(
    task: str, results: dict[str, Any]
) -> list[tuple[str, str, str, float, list[dict[str, Any]]]]:
    """(name, metric, filter key, lm-eval's value, that filter's samples) of every metric of a task
    whose per-sample values are all numbers; name is `metric` under filter `none`, else `metric,filter`."""
    summary = results["results"][task]
    by_filter: dict[str, list[dict[str, Any]]] = {}
    for sample in results["samples"][task]:
        by_filter.setdefault(str(sample.get("filter", "none")), []).append(sample)
    out = []
    for key, value in summary.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr") or filt not in by_filter:
            continue
        point = _number(value)
        per_sample = [_number(s.get(metric)) for s in by_filter[filt]]
        if point is None or not per_sample or any(v is None for v in per_sample):
            continue
        out.append((metric if filt == "none" else key, metric, filt, point, by_filter[filt]))
    return out


def task_metrics(
    task: str, results: dict[str, Any], *, seed: int, resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, dict[str, Any]]:
    """One task's metrics from `simple_evaluate`'s output: value, stderr, n and our bootstrap CI.

    A metric under lm-eval's filter `none` keeps its name (`acc`); under another filter it is
    `<metric>,<filter>` as lm-eval writes it (`exact_match,strict-match`). Only metrics whose
    per-sample values are numbers (mean-type metrics: acc, acc_norm, exact_match...) are returned.

    Returns:
        {metric: {"value": float, "ci": [lo, hi], "n": int, "stderr": float | None}}.
    """
    summary = results["results"][task]
    out: dict[str, dict[str, Any]] = {}
    for name, metric, filt, point, samples in _numeric_metrics(task, results):
        values = [float(s[metric]) for s in samples]
        stderr = _number(summary.get(f"{metric}_stderr,{filt}"))
        lo, hi = bootstrap_ci(values, seed=seed, resamples=resamples)
        # lm-eval's value is its aggregation (the mean here); the CI is widened to contain it exactly.
        out[name] = {
            "value": point,
            "ci": [min(lo, point), max(hi, point)],
            "n": len(values),
            "stderr": stderr,
        }
    return out


def task_samples(task: str, results: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """The per-sample values behind each of `task_metrics`' metrics, ordered by lm-eval's doc id, so two
    models run on the same task pair up item by item (`finescope_core.evaluate.paired`).

    Returns:
        {metric: {"doc_ids": [...], "values": [float, ...]}}, the names as `task_metrics` gives them.
    """
    out: dict[str, dict[str, list[Any]]] = {}
    for name, metric, _, _, samples in _numeric_metrics(task, results):
        rows = sorted(((s.get("doc_id"), float(s[metric])) for s in samples), key=lambda r: _doc_order(r[0]))
        out[name] = {"doc_ids": [doc for doc, _ in rows], "values": [v for _, v in rows]}
    return out


def _doc_order(doc_id: Any) -> tuple[int, Any]:
    """Sort key of lm-eval doc ids (ints in practice): numbers first, in order, then anything else as text."""
    if isinstance(doc_id, int | np.integer) and not isinstance(doc_id, bool):
        return (0, int(doc_id))
    return (1, str(doc_id))


def run_harness(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
    docs: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `cfg.lm_eval_tasks` with lm-evaluation-harness on an in-memory model and tokenizer.

    The model is wrapped in lm-eval's `HFLM` as it is (no copy, no re-load). Each task is cut to
    `harness_limit(cfg)` examples and run zero-shot with every lm-eval seed set to `seed`, one
    `simple_evaluate` call per run (`harness_runs`: plain and/or with the chat template). A task in
    `docs` (task -> doc ids, those that passed the contamination check) runs on the first
    `harness_limit(cfg)` of those ids instead of its first documents;
    `progress(done, total, metric="lm_eval", task=label)` is called after each run (lm-eval offers its
    Python API no per-batch hook).

    Returns:
        label -> lm-eval's output for that run (`results`, `configs`, and `samples`: the per-sample
        log), its per-task entries under the label (`<task>` or `<task>@chat`).

    Raises:
        EvalError: a bad include directory or unknown task (`check_harness_config`), or a name that
            lm-eval returns no results for (a group of tasks: name its tasks instead).
    """
    manager = check_harness_config(cfg)
    if manager is None:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    runs = harness_runs(cfg)
    if any(chat for _, _, chat in runs) and not getattr(tokenizer, "chat_template", None):
        raise EvalError(
            f"evaluate.lm_eval_chat_template={cfg.lm_eval_chat_template!r}, but the model's tokenizer "
            "has no chat template; set evaluate.lm_eval_chat_template: off"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
    out: dict[str, dict[str, Any]] = {}
    for i, (label, name, chat) in enumerate(runs):
        chosen = {name: list(docs[name])[: harness_limit(cfg)]} if docs and name in docs else None
        results = simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=manager,
            log_samples=True,
            limit=None if chosen else harness_limit(cfg),
            samples=chosen,
            bootstrap_iters=_LM_EVAL_BOOTSTRAP_ITERS,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="WARNING",
            apply_chat_template=chat,
        )
        if (
            results is None
            or name not in results.get("results", {})
            or name not in results.get("samples", {})
        ):
            raise EvalError(
                f"evaluate.lm_eval_tasks: lm-eval returned no results for {name!r}; if it is a group, "
                "name its tasks instead"
            )
        out[label] = _relabelled(results, name, label)
        progress(i + 1, len(runs), metric="lm_eval", task=label)
    return out


def _relabelled(results: dict[str, Any], task: str, label: str) -> dict[str, Any]:
    """lm-eval's output for `task` with its per-task entries under `label` (the chat-template run's name)."""
    if label == task:
        return results
    out = dict(results)
    for section in ("results", "samples", "configs", "n-samples", "versions", "higher_is_better"):
        if isinstance(results.get(section), dict) and task in results[section]:
            out[section] = {label if k == task else k: v for k, v in results[section].items()}
    return out


def harness_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
    samples: dict[str, Any] | None = None,
    docs: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """`run_harness`, reduced to each task's metrics with n and our bootstrap CI (`task_metrics`).

    `samples`, when given, is filled with the per-sample values behind them from the same run
    (`task_samples`): {task: {metric: {"doc_ids", "values"}}}. `docs` as in `run_harness`.

    Returns:
        {task: {metric: {"value", "ci": [lo, hi], "n", "stderr"}}}; {} when `cfg.lm_eval_tasks` is empty.

    Raises:
        EvalError: as `run_harness`, or a task that yields no metric with per-sample numbers.
    """
    runs = run_harness(model, tokenizer, cfg, seed=seed, batch_size=batch_size, progress=progress, docs=docs)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, results in runs.items():
        out[name] = task_metrics(name, results, seed=seed, resamples=cfg.bootstrap_resamples)
        if not out[name]:
            raise EvalError(
                f"evaluate.lm_eval_tasks: task {name!r} has no metric with per-sample numbers (acc, "
                "exact_match, ...) to report"
            )
        if samples is not None:
            samples[name] = task_samples(name, results)
    return out

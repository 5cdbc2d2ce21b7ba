"""Every declared stage's key model, and each config field that no key reads, with the reason.

A new config field must land in one of the two: read by a stage (in its key model's `CONFIG` or
`DERIVED`), or listed here with why it cannot change any stage's output. `tests/flows/test_keys.py`
changes every field in turn and checks the keys that change are exactly those of the stages that read it.
"""

from __future__ import annotations

# Importing the task modules declares their stages (`tasks.registry.STAGES`).
import tasks.activations
import tasks.codes
import tasks.data
import tasks.evaluate
import tasks.finetune
import tasks.models
import tasks.prune
import tasks.recover
import tasks.report
import tasks.retrieve
import tasks.sae
import tasks.saliency
import tasks.teacher  # noqa: F401
from tasks.keymodels import StageKeyModel
from tasks.registry import STAGES


def key_models() -> list[type[StageKeyModel]]:
    """The key model of every declared stage (a stage declared later, e.g. a plugin's, included)."""
    return [stage.key for stage in STAGES.values() if stage.key is not None]


UNKEYED: dict[str, str] = {
    "name": "names the run's Prefect artifacts and default output directory",
    "output": "where the outputs are exported, after every stage",
    "model": "reaches every key through the model's content hash (`ModelRef.sha256`)",
    "seeds": "reaches the keys through the seeds' content hash",
    "corpus": "reaches the keys through the corpus' content hash",
    "curate.sae_corpus": "reaches the saliency, activations and SAE keys through its content hash (as the "
    "records they are computed on, in place of the corpus')",
    "store": "where the artifacts are kept",
    "storage": "how the store is reached",
    "memory_budget": "a preflight check: it refuses a run or lets it start; under finetune.method auto it "
    "reaches the tuned key through the method it resolves to (the key holds the resolved method)",
    "prune.data": "reaches the pruning key through the pruning texts' content hash",
    "teacher.model": "reaches the distilled key through the teacher's content hash",
    "teacher.device_map": "where the teacher's layers live: the same outputs on one device or spread "
    "over several",
    "evaluate.eval_file": "reaches the curated key through the held-out ids' hash (its duplicates leave "
    "the pool) and the evaluation key through the evaluation data's content hash",
    "evaluate.split_fraction": "reaches the keys through the split: the held-out ids' hash (curated), "
    "pruning texts, teacher records, evaluation data",
    "evaluate.split_max": "reaches the keys through the split, as evaluate.split_fraction",
    "evaluate.domain_items": "reaches the evaluation key through the evaluation data's content hash",
    "evaluate.general_file": "reaches the curated key through the held-out ids' hash and the evaluation key "
    "through the evaluation data's content hash",
    "evaluate.general_items": "reaches the evaluation key through the evaluation data's content hash",
    "evaluate.mc_file": "reaches the evaluation key through the evaluation data's content hash",
    "evaluate.numeric_file": "reaches the evaluation key through the evaluation data's content hash",
    "evaluate.lm_eval_include": "reaches the evaluation key through its task YAMLs' and data files' content "
    "hash",
    "evaluate.baselines": "decides which variants run, not what any stage computes",
    "evaluate.generic_file": "reaches the generic variant's pruned, distilled and tuned keys through its "
    "records' content (the pruning texts' hash, the teacher's records)",
    "orchestration.task_runner": "where stages run: every runner gives the same artifacts",
    "orchestration.address": "where stages run: model stages key the device kind and dtype resolved there",
    "orchestration.workers": "how many run at once",
    "orchestration.gpu_workers": "which workers run the GPU tasks: model stages key the device kind and "
    "dtype the worker resolves (`tasks.identity.work_precision`), not the setting",
    "orchestration.gpu_concurrency": "how many GPU tasks run at once",
    "orchestration.persist_results": "whether Prefect keeps its task results; the artifacts are the same",
}
"""Config fields (or whole sections) that no stage key reads, and why."""

"""lm-evaluation-harness tasks for the demo's math domain, written at run time over local data files.

No hub is reachable, so the demo cannot run lm-eval's stock `gsm8k`. Instead it builds two tasks from
the GSM8K test problems that the demo corpus left out (the corpus keeps a seeded sample, see
`finescope_core.demo.DEFAULT_SOURCE_CAPS`), so neither curation, pruning nor tuning saw them:

* `finescope_gsm8k_next_step` (multiple choice, log-likelihood, acc / acc_norm): the question and
  the first k (0-2) lines of its worked solution, then which line comes next: the true one or three lines
  of other problems' solutions (seeded). Chance is 0.25.
* `finescope_gsm8k_answer` (generation, exact match on the final number): one worked example in the
  GSM8K `#### N` format, then the question; greedy, a short budget, cut at the next question; the last
  number of the answer is compared with the reference's `#### N`.

Each task is a YAML file beside its JSONL data (`data_files` absolute), in one directory that
`evaluate.lm_eval_include` names; the stock `lm_eval --include_path DIR` reads the same files.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finescope_core import io
from finescope_core.prompts import plain_prompt

NEXT_STEP_TASK = "finescope_gsm8k_next_step"
ANSWER_TASK = "finescope_gsm8k_answer"
DEMO_TASKS = (NEXT_STEP_TASK, ANSWER_TASK)
MAX_ITEMS = 200
"""Items per task (the evaluate stage's `lm_eval_limit` may run fewer)."""
MAX_SHOWN_STEPS = 2
"""The next-step context shows at most this many solution lines (short contexts: 4 choices cost 4
passes)."""
ANSWER_MAX_NEW_TOKENS = 64
"""Generation budget of the answer task: a short worked solution; a cut-off one still ends in its last
number, which is compared."""
_FINAL = re.compile(r"^####\s*(.+?)\s*$")
_NUMBER_PATTERN = r"-?[0-9][0-9,]*(?:\.[0-9]+)?"


def _steps_and_answer(solution: str) -> tuple[list[str], str] | None:
    """(solution lines before the final `#### N`, N without commas), or None without a final line."""
    lines = [line.strip() for line in solution.splitlines() if line.strip()]
    if not lines:
        return None
    final = _FINAL.match(lines[-1])
    if final is None:
        return None
    return lines[:-1], final.group(1).replace(",", "")


def next_step_items(
    problems: Sequence[dict[str, str]], *, seed: int, size: int = MAX_ITEMS
) -> list[dict[str, Any]]:
    """Multiple-choice "next solution step" items: {context, choices, label} (label: index of the true line).

    Args:
        problems: records with `instruction` (the question) and `output` (the worked solution).
        seed: seeds the problems drawn, each k, the distractors and the choice order.
        size: at most this many items.
    """
    rng = random.Random(f"{seed}:next-step")
    parsed = [(p, s) for p in problems if (s := _steps_and_answer(p["output"])) and len(s[0]) >= 2]
    pool = [(i, line) for i, (_, (steps, _)) in enumerate(parsed) for line in steps]
    items = []
    for i in sorted(rng.sample(range(len(parsed)), min(size, len(parsed)))):
        problem, (steps, _) = parsed[i]
        k = rng.randrange(min(len(steps), MAX_SHOWN_STEPS + 1))
        true = steps[k]
        distractors: list[str] = []
        while len(distractors) < 3:
            owner, line = pool[rng.randrange(len(pool))]
            if owner != i and line != true and line not in distractors:
                distractors.append(line)
        choices = [true, *distractors]
        rng.shuffle(choices)
        context = plain_prompt(problem["instruction"]) + "".join(f"\n{line}" for line in steps[:k])
        items.append(
            {"id": problem["id"], "context": context, "choices": choices, "label": choices.index(true)}
        )
    return items


def answer_items(
    problems: Sequence[dict[str, str]], *, seed: int, size: int = MAX_ITEMS
) -> list[dict[str, Any]]:
    """Generation items {prompt, answer}: one worked example (the shortest problem, not an item) in the
    `#### N` format, then the question; `answer` is the reference's final number."""
    usable = [(p, s) for p in problems if (s := _steps_and_answer(p["output"]))]
    if len(usable) < 2:
        return []
    usable.sort(key=lambda ps: len(ps[0]["instruction"]) + len(ps[0]["output"]))
    (shot, (shot_steps, shot_answer)), rest = usable[0], usable[1:]
    rest.sort(key=lambda ps: ps[0]["id"])
    example = (
        plain_prompt(shot["instruction"]) + " " + "\n".join([*shot_steps, f"#### {shot_answer}"]) + "\n\n"
    )
    rng = random.Random(f"{seed}:answer")
    chosen = sorted(rng.sample(range(len(rest)), min(size, len(rest))))
    return [
        {
            "id": rest[i][0]["id"],
            "prompt": example + plain_prompt(rest[i][0]["instruction"]),
            "answer": rest[i][1][1],
        }
        for i in chosen
    ]


def _task_yaml(name: str, data: Path, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **body,
        "metadata": {"version": 1.0},
    }


def write_demo_harness_tasks(
    out_dir: Path, heldout: Sequence[dict[str, str]], *, seed: int = 0
) -> Path | None:
    """Write both demo tasks (YAML + JSONL) into `out_dir` from GSM8K problems the corpus does not hold.

    Args:
        out_dir: the include directory for `evaluate.lm_eval_include` (created if needed).
        heldout: GSM8K records (`instruction`, `output`, `id`) that are not in the demo corpus.
        seed: seeds the items; the same problems and seed give the same files.

    Returns:
        `out_dir`, or None when there are too few held-out problems for either task.
    """
    # The two tasks draw from disjoint halves, so no problem is both a choice item and an answer item.
    half = len(heldout) // 2
    mc, gen = next_step_items(heldout[:half], seed=seed), answer_items(heldout[half:], seed=seed)
    if not mc or not gen:
        return None
    out_dir = Path(out_dir).resolve()
    mc_data, gen_data = out_dir / f"{NEXT_STEP_TASK}.jsonl", out_dir / f"{ANSWER_TASK}.jsonl"
    io.write_jsonl(mc, mc_data, atomic=True)
    io.write_jsonl(gen, gen_data, atomic=True)
    next_step = _task_yaml(
        NEXT_STEP_TASK,
        mc_data,
        {
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "target_delimiter": "\n",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
    )
    answer = _task_yaml(
        ANSWER_TASK,
        gen_data,
        {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {
                "until": ["Question:", "\n\n"],
                "max_gen_toks": ANSWER_MAX_NEW_TOKENS,
                "do_sample": False,
            },
            "filter_list": [
                {
                    "name": "last-number",
                    "filter": [
                        {"function": "regex", "regex_pattern": _NUMBER_PATTERN, "group_select": -1},
                        {"function": "take_first"},
                    ],
                }
            ],
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "regexes_to_ignore": [",", "\\.0+$"],
                }
            ],
        },
    )
    for name, doc in ((NEXT_STEP_TASK, next_step), (ANSWER_TASK, answer)):
        io.write_atomic(out_dir / f"{name}.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return out_dir

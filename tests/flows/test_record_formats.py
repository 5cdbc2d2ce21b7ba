"""`finescope run` on records as users export them: integer ids, and chat `messages` records.

Integer ids are the norm in JSONL and HF exports; they must come back as the same (string) ids from
curated.jsonl, and the held-out evaluation records must stay out of the baseline's training data.
"""

import json

import pytest
from tiny_run import TINY_LORA

from finescope_core.config import FinescopeConfig
from finescope_core.tiny import save_tiny
from flows.cli import main
from flows.specialize import specialize_flow
from tasks.caching import artifact_dir
from tasks.context import RunContext, open_store
from tasks.prune import curated_records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats-model")
    return save_tiny(root / "model", "qwen2", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256)


def instruction_rows() -> list[dict]:
    rows = [
        {"id": i, "instruction": f"What is {i} plus {i + 1}?", "output": f"{2 * i + 1}"} for i in range(40)
    ]
    return rows + [
        {"id": 100 + i, "instruction": f"Say hello to friend {i}.", "output": "Hello!"} for i in range(40)
    ]


def chat_rows() -> list[dict]:
    """The same requests as chat `messages` (with a system turn) and as prompt/completion records."""
    rows = [
        {
            "id": i,
            "messages": [
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                {"role": "assistant", "content": f"{2 * i + 1}"},
            ],
        }
        for i in range(40)
    ]
    return rows + [
        {"id": 100 + i, "prompt": f"Say hello to friend {i}.", "completion": "Hello!"} for i in range(40)
    ]


def write_inputs(root, corpus: list[dict], seed: dict) -> None:
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "seeds.jsonl").write_text(json.dumps(seed) + "\n")


def config(root, model_dir) -> FinescopeConfig:
    return FinescopeConfig(
        model=str(model_dir),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        curate={
            "final_size": 30,
            "top_m": 30,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "sae": {"d_sae": 32, "steps": 20, "batch_size": 16},
        },
        prune={"ratio": 0.2, "max_length": 32},
        teacher={"max_new_tokens": 4, "batch_size": 16},
        finetune={**TINY_LORA, "batch_size": 8},
        evaluate={"split_fraction": 0.3, "max_length": 32, "baselines": ["random"]},
    )


def run_and_check(root, model_dir, corpus: list[dict], seed: dict) -> list[dict]:
    """`finescope run`, then the checks every format must pass; returns the distilled lines of the
    curated set."""
    write_inputs(root, corpus, seed)
    cfg = config(root, model_dir)
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(cfg.model_dump_json())
    assert main(["run", "--config", str(cfg_file), "--out", str(root / "out")]) == 0
    exported = [
        json.loads(line) for line in (root / "out" / "curated" / "curated.jsonl").read_text().splitlines()
    ]
    assert exported and all(isinstance(r["id"], str) for r in exported)

    result = specialize_flow(cfg)  # every stage cached: only to reach the artifacts
    store = open_store(cfg)
    train = [
        {"id": r.id} for r in curated_records(RunContext.of(cfg), result.curate.corpus, result.curate.curated)
    ]
    held = [{"id": i} for i in result.curate.held_out.split]
    corpus_ids = {str(r["id"]) for r in corpus}
    assert held and train and all(isinstance(r["id"], str) and r["id"] in corpus_ids for r in train + held)

    def distilled_ids(name: str) -> list[str]:
        path = artifact_dir(store, result.variants[name].distilled) / "distilled.jsonl"
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]

    assert distilled_ids("") == [r["id"] for r in train]
    baseline = distilled_ids("random")
    assert len(baseline) == len(train) and not {r["id"] for r in held} & set(baseline)
    path = artifact_dir(store, result.variants[""].distilled) / "distilled.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_integer_ids_go_through_finescope_run(tmp_path, model_dir):
    corpus = instruction_rows()
    lines = run_and_check(
        tmp_path, model_dir, corpus, {"id": 1, "instruction": "What is 100 plus 7?", "output": "107"}
    )
    by_id = {str(r["id"]): r for r in corpus}
    assert all(line["prompt"] == by_id[line["id"]]["instruction"] for line in lines)


def test_chat_and_prompt_completion_records_go_through_finescope_run(tmp_path, model_dir):
    seed = {
        "id": 1,
        "messages": [
            {"role": "user", "content": "What is 100 plus 7?"},
            {"role": "assistant", "content": "107"},
        ],
    }
    lines = run_and_check(tmp_path, model_dir, chat_rows(), seed)
    expected = {str(i): f"Answer with a number.\n\nWhat is {i} plus {i + 1}?" for i in range(40)}
    expected |= {str(100 + i): f"Say hello to friend {i}." for i in range(40)}
    assert all(line["prompt"] == expected[line["id"]] for line in lines)
    assert {line["source"] for line in lines} <= {"teacher", "reference"}  # every record has a reference

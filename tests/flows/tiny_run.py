"""The tiny end-to-end run shared by the store tests: a workspace (model, corpus, seeds) and its config."""

import json
from pathlib import Path
from typing import Any

import yaml

from finescope_core.tiny import save_tiny

TINY_LORA = {
    "method": "lora",
    "rank": 4,
    "alpha": 8,
    "epochs": 1,
    "batch_size": 4,
    "grad_accum": 1,
    "max_length": 48,
}
"""The tiny runs' tuning: a rank-4 LoRA, one epoch (pinned: `auto` would tune fully on a roomy machine)."""


def write_workspace(root: Path, questions: int = 30) -> Path:
    """A tiny Qwen2 model, `questions` arithmetic + 20 greeting records and one seed under `root`."""
    save_tiny(root / "model", "qwen2", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=128)
    rows = [
        {"id": f"q{i}", "instruction": f"What is {i} plus {i + 1}?", "output": f"{2 * i + 1}"}
        for i in range(questions)
    ]
    rows += [
        {"id": f"c{i}", "instruction": f"Say hello to friend {i}.", "output": "Hello!"} for i in range(20)
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "seeds.jsonl").write_text(
        json.dumps({"instruction": "What is 100 plus 7?", "output": "107"}) + "\n"
    )
    return root


def config_file(root: Path, store: Path | str, path: Path, **sections: Any) -> Path:
    """The run's config at `path`; `sections` replace whole top-level fields (e.g. `teacher`, `storage`)."""
    cfg = {
        "model": str(root / "model"),
        "seeds": [str(root / "seeds.jsonl")],
        "corpus": [str(root / "corpus.jsonl")],
        "store": str(store),
        "device": "cpu",
        "curate": {
            "final_size": 24,
            "top_m": 24,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "sae": {"d_sae": 32, "steps": 10, "batch_size": 16},
        },
        "prune": {"ratio": 0.2, "max_length": 32},
        "teacher": {"max_new_tokens": 8, "batch_size": 8, "min_response_chars": 0},
        "finetune": TINY_LORA,
        "evaluate": {"split_fraction": 0.2, "max_length": 32},
        "recover": {"tokens": 0},  # the library's budget is for real corpora (a subprocess run reads this)
        **sections,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_text_workspace(root: Path, definitions: int = 40) -> Path:
    """A plain-text domain: a tiny Qwen2 model, `definitions` short legal definitions + 30 cooking notes
    as `text` records, and two definitions as seeds (no record has a request or a reference)."""
    save_tiny(root / "model", "qwen2", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=128)
    rows = [
        {"id": f"d{i}", "text": f"Term {i}: a party to contract {i} owes the duty of clause {i + 1}."}
        for i in range(definitions)
    ]
    rows += [{"id": f"k{i}", "text": f"Stir soup {i} and add {i + 2} cups of rice."} for i in range(30)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seeds = [{"text": "Term 100: a party to contract 100 owes the duty of clause 7."}]
    seeds.append({"text": "Term 200: a party to contract 200 owes the duty of clause 9."})
    (root / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    return root

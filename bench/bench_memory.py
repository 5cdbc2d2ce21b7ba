"""Peak memory of each stage of `finescope run` on a model with Llama-3.2-1B's widths, beside a baseline.

A randomly initialised Llama with Llama-3.2-1B's widths (hidden 2048, 32 query / 8 KV heads, MLP 8192;
`--layers` decoder layers instead of 16, a byte vocabulary) is saved to disk, and the real flow runs on it
exactly as a user runs it (`python -m flows.cli run`), in a child process, on a tiny corpus, once per
dtype (float32, bfloat16) and per code tree: this checkout, and `--baseline-ref` (default: the commit
before the memory work) checked out beside it with `git worktree`, measured in the same invocation.

The child's resident set (RSS, psutil) is sampled every `--interval` seconds. A sample belongs to the
stage whose work directory (`<store>/.partial/<stage>/<key>`, present exactly while the stage builds)
appeared last; samples outside any stage belong to `between` (flow-level work, export). Peaks are
reported above the RSS just before the first model stage starts (`pre-model`), in GB and as a multiple
of the model's bytes in the dtype it runs in; the predicted peak (`finescope_core.memplan`) is printed
beside each stage when this checkout has the planner.

    python bench/bench_memory.py                              # 4 layers, float32 and bfloat16, with baseline
    python bench/bench_memory.py --dtypes float32 --no-baseline
    python bench/bench_memory.py --report bench-memory.json   # reprint a saved measurement

CPU only; each run takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE_REF = "c9449ee"
WIDTHS = dict(hidden=2048, heads=32, kv_heads=8, intermediate=8192)
BYTES = {"float32": 4, "bfloat16": 2}
TOPIC = ["integral", "derivative", "matrix", "theorem", "prime", "equation", "vector", "algebra", "proof"]
OTHER = ["the", "river", "house", "music", "film", "team", "year", "school", "road", "market", "garden"]
GB = 1e9


def write_workspace(root: Path, layers: int) -> int:
    """The model directory (float32 on disk), corpus and seeds; returns the model's parameter count."""
    from finescope_core.tiny import save_tiny

    save_tiny(root / "model", "llama", layers=layers, **WIDTHS)
    write_data(root, records=60, words=8)
    config = json.loads((root / "model" / "config.json").read_text())
    return _param_count(config)


def write_data(root: Path, records: int, words: int) -> None:
    """`corpus.jsonl` (every third record on a math topic, the rest everyday words) and four math seeds."""
    rows = []
    for i in range(records):
        pool = TOPIC if i % 3 == 0 else OTHER
        text = " ".join(pool[(i * 7 + j * 3) % len(pool)] for j in range(words))
        rows.append({"id": f"r{i}", "instruction": f"Explain item {i}: {text}", "output": text})
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seeds = [{"instruction": f"Prove the {w} theorem.", "output": f"The {w} follows."} for w in TOPIC[:4]]
    (root / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeds))


def _param_count(c: dict[str, Any]) -> int:
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    head = 0 if c.get("tie_word_embeddings") else v * h
    return layers * per_layer + v * h + head + h


def run_config(root: Path, store: Path, dtype: str, layers: int) -> dict[str, Any]:
    return {
        "model": str(root / "model"),
        "seeds": [str(root / "seeds.jsonl")],
        "corpus": [str(root / "corpus.jsonl")],
        "store": str(store),
        "device": "cpu",
        "model_dtype": dtype,
        "curate": {
            "final_size": 12,
            "top_m": 12,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "batch_size": 8,
            "num_layers": min(layers, 4),
            "sae": {"d_sae": 32, "steps": 20, "batch_size": 16},
        },
        "prune": {"ratio": 0.3, "max_length": 32, "batch_size": 4},
        "teacher": {"max_new_tokens": 8, "batch_size": 4, "max_prompt_length": 384},
        "finetune": {
            "rank": 8,
            "alpha": 16,
            "epochs": 1,
            "batch_size": 2,
            "grad_accum": 1,
            "max_length": 192,
        },
        "evaluate": {
            "split_fraction": 0.2,
            "max_length": 160,
            "max_new_tokens": 8,
            "max_examples": 8,
            "domain_items": 8,
            "general_items": 8,
            "bootstrap_resamples": 100,
        },
    }


class Sampler:
    """RSS of a process tree every `interval` s, each sample filed under the stage building then."""

    def __init__(self, pid: int, partial: Path, interval: float):
        self.proc = psutil.Process(pid)
        self.partial = partial
        self.interval = interval
        self.samples: list[tuple[float, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _rss(self) -> int:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.NoSuchProcess:
            return 0

    def _stage(self) -> str:
        try:
            dirs = [d for s in self.partial.iterdir() for d in s.iterdir() if d.is_dir()]
        except FileNotFoundError:
            return "between"
        if not dirs:
            return "between"
        return max(dirs, key=lambda d: d.stat().st_ctime).parent.name

    def _loop(self) -> None:
        start = time.perf_counter()
        while not self.stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                self.samples.append((time.perf_counter() - start, self._stage(), self._rss()))
            self.stop.wait(self.interval)


MODEL_STAGES = ("saliency", "activation-shards", "activations", "pruned", "distilled", "tuned", "evaluation")


def summarise(samples: list[tuple[float, str, int]]) -> dict[str, Any]:
    """Peak RSS per stage above the RSS just before the first model stage, and the whole run's."""
    first = next((i for i, (_, s, _) in enumerate(samples) if s in MODEL_STAGES), len(samples))
    base = samples[first - 1][2] if first > 0 else samples[0][2]
    peaks: dict[str, int] = {}
    for _, stage, rss in samples[first:]:
        peaks[stage] = max(peaks.get(stage, 0), rss - base)
    whole = max((rss for _, _, rss in samples[first:]), default=base) - base
    return {"pre_model_rss": base, "stages": peaks, "whole": whole, "samples": len(samples)}


def run_flow(code: Path, root: Path, dtype: str, layers: int, interval: float) -> dict[str, Any]:
    """One `finescope run` in a fresh store with the code of `code`; its RSS summary and wall time."""
    store = Path(tempfile.mkdtemp(prefix=f"store-{dtype}-", dir=root))
    cfg_file = store.with_suffix(".json")
    cfg_file.write_text(json.dumps(run_config(root, store, dtype, layers)))
    env = {**os.environ, "PYTHONPATH": str(code), "PREFECT_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg_file), "--out", str(store / "out")]
    start = time.perf_counter()
    with open(store.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, store / ".partial", interval)
        sampler.thread.start()
        code_rc = proc.wait()
        sampler.stop.set()
        sampler.thread.join()
    if code_rc != 0:
        tail = store.with_suffix(".log").read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"finescope run failed ({code_rc}) with {code}:\n" + "\n".join(tail))
    return {**summarise(sampler.samples), "seconds": time.perf_counter() - start}


def workspace(root: Path, dtype: str, layers: int, checkpoint: str) -> Path:
    """`root` itself for a float32 checkpoint; else a copy of the workspace with the model saved in
    `dtype`."""
    if checkpoint == "float32" or dtype == "float32":
        return root
    import torch
    from transformers import AutoModelForCausalLM

    home = root / f"checkpoint-{dtype}"
    write_workspace(home, layers)
    model = AutoModelForCausalLM.from_pretrained(home / "model", dtype=getattr(torch, dtype))
    model.save_pretrained(home / "model", safe_serialization=True)
    return home


@contextlib.contextmanager
def baseline_tree(ref: str, where: Path) -> Iterator[Path]:
    """`ref` checked out in a temporary git worktree (removed afterwards)."""
    path = where / f"baseline-{ref}"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True, capture_output=True
    )
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def predictions(root: Path, dtype: str, layers: int) -> dict[str, int]:
    """The planner's predicted peak per store stage, when this checkout has one."""
    try:
        from finescope_core.memplan import plan_memory
    except ImportError:
        return {}
    from transformers import AutoConfig

    from finescope_core.config import FinescopeConfig

    cfg = FinescopeConfig.model_validate(run_config(root, root / "store", dtype, layers))
    peaks = plan_memory(cfg, AutoConfig.from_pretrained(root / "model")).by_stage()
    return {**peaks, "whole run": max(peaks.values())}


def table(result: dict[str, Any]) -> str:
    """The per-stage table of one dtype: this tree, its prediction, the baseline."""
    model_bytes = result["model_bytes"]
    runs, predicted = result["runs"], result.get("predicted", {})
    names = list(dict.fromkeys(s for run in runs.values() for s in run["stages"]))
    head = ["stage", *(f"{tree} GB (x)" for tree in runs), "predicted GB (x)", "pred/meas"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(value: int | None) -> str:
        return "–" if value is None else f"{value / GB:.2f} ({value / model_bytes:.2f})"

    current = runs.get("this")
    for name in [*names, "whole run"]:
        vals = [run["whole"] if name == "whole run" else run["stages"].get(name) for run in runs.values()]
        pred = predicted.get(name)
        measured = (
            current["whole"]
            if current and name == "whole run"
            else (current or {}).get("stages", {}).get(name)
        )
        ratio = f"{pred / measured:.2f}" if pred and measured else "–"
        lines.append("| " + " | ".join([name, *map(cell, vals), cell(pred), ratio]) + " |")
    seconds = ", ".join(f"{tree} {run['seconds']:.0f} s" for tree, run in runs.items())
    return (
        f"{result['dtype']}: model {model_bytes / GB:.2f} GB ({result['params'] / 1e6:.0f}M params); "
        f"wall {seconds}\n" + "\n".join(lines)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (Llama-3.2-1B has 16)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref measured beside this checkout")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--checkpoint",
        choices=["float32", "run"],
        default="float32",
        help="the dtype the model is saved in: float32, or each run's own dtype (as 1B-8B checkpoints "
        "ship in bf16)",
    )
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    ap.add_argument("--json", type=Path, default=Path("bench-memory.json"), help="where the measurements go")
    ap.add_argument("--report", type=Path, help="only reprint the tables of a saved --json file")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:  # predictions from today's planner
            (Path(tmp) / "model").mkdir()
            for r in saved["results"]:
                # `--checkpoint run` saved the model in the run's dtype: the planner reads it from the config
                stored = r["dtype"] if r.get("checkpoint") == "run" else saved["model_config"].get("dtype")
                config = {**saved["model_config"], "dtype": stored}
                (Path(tmp) / "model" / "config.json").write_text(json.dumps(config))
                r["predicted"] = predictions(Path(tmp), r["dtype"], saved["layers"])
        print("\n\n".join(table(r) for r in saved["results"]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        params = write_workspace(root, args.layers)
        with contextlib.ExitStack() as stack:
            trees = {"this": ROOT}
            if not args.no_baseline:
                trees["baseline"] = stack.enter_context(baseline_tree(args.baseline_ref, root))
            results = []
            for dtype in args.dtypes.split(","):
                home = workspace(root, dtype, args.layers, args.checkpoint)
                runs = {
                    name: run_flow(code, home, dtype, args.layers, args.interval)
                    for name, code in trees.items()
                }
                predicted = predictions(home, dtype, args.layers)
                model_bytes = params * BYTES[dtype]
                result = {
                    "dtype": dtype,
                    "checkpoint": args.checkpoint,
                    "params": params,
                    "model_bytes": model_bytes,
                    "runs": runs,
                    "predicted": predicted,
                }
                results.append(result)
                print(table(result) + "\n", flush=True)
                model_config = json.loads((root / "model" / "config.json").read_text())
                saved = {"layers": args.layers, "model_config": model_config, "results": results}
                args.json.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()

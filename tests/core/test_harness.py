"""lm-evaluation-harness on tiny random models: our in-memory call, the stock `lm_eval` CLI on the saved
directory and our own log-likelihood scorer agree; generation exact match agrees with a direct check of
the generated text; the CIs come from the per-sample results; bad setups are refused with the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from finescope_core.config import EvalConfig, PruneConfig, load_config
from finescope_core.evaluate import (
    EvalError,
    bootstrap_ci,
    check_harness_config,
    choice_logprobs,
    harness_include_sha,
    harness_metrics,
    mc_accuracy,
    metrics_schema_errors,
    run_harness,
)
from finescope_core.evaluate.harness import task_metrics
from finescope_core.prune import prune_model, save_pruned
from finescope_core.tiny import byte_tokenizer, save_tiny, tiny_model

MC_TASK, GEN_TASK = "tiny_mc", "tiny_gen"
# Choices of different lengths and first letters, so the random model's preferences vary by item.
MC_ITEMS = [
    {"question": "2 + 2", "choices": ["4", "five", "6 or so", "22"], "answer": 0},
    {"question": "capital of France", "choices": ["Rome", "Paris", "a big city", "Oslo"], "answer": 1},
    {"question": "colour of the sky", "choices": ["green", "red", "blue", "it depends"], "answer": 2},
    {"question": "3 * 3", "choices": ["6", "9", "33", "nine"], "answer": 1},
    {"question": "first letter", "choices": ["b", "z", "q", "a"], "answer": 3},
    {"question": "opposite of hot", "choices": ["cold", "warm", "tepid", "ice"], "answer": 0},
    {"question": "10 - 7", "choices": ["3", "4", "seven", "17"], "answer": 0},
    {"question": "a pet", "choices": ["rock", "stone", "cat", "sand"], "answer": 2},
]


def _mc_task(root: Path, items: list[dict]) -> Path:
    """A multiple-choice task over a local JSONL, with the conventions of `mc_prompt` / `mc_accuracy`:
    prompt `Question: ...\\nAnswer:`, each choice after lm-eval's default target delimiter " "."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": MC_TASK,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            }
        )
    )
    return root


def _gen_task(root: Path, items: list[dict], max_gen_toks: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "gen.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "gen.yaml").write_text(
        yaml.safe_dump(
            {
                "task": GEN_TASK,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(root / "gen.jsonl")}},
                "test_split": "test",
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{target}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A pruned tiny model saved as the prune stage saves it (the exported `pruned-model/`; the tuned
    model is the same architecture with the LoRA merged in), so the stock CLI must load what we export."""
    root = tmp_path_factory.mktemp("tiny")
    model = AutoModelForCausalLM.from_pretrained(save_tiny(root / "base", seed=3), dtype=torch.float32)
    plan = prune_model(
        model, byte_tokenizer(), ["some pruning text", "and more of it"], PruneConfig(ratio=0.3)
    )
    assert plan.ratio > 0.2
    return save_pruned(model, byte_tokenizer(), plan, root / "pruned-model")


def _lm_eval_cli() -> str:
    found = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    assert Path(found).exists(), "the lm_eval command of the lm-eval package is not installed"
    return found


def _stock_cli(model_dir: Path, include: Path, out: Path, home: Path, *extra: str) -> Path:
    """`lm_eval --model hf` on a saved directory, offline, samples logged under `out` (returned)."""
    proc = subprocess.run(
        [
            _lm_eval_cli(),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir},dtype=float32",
            "--tasks",
            MC_TASK,
            "--include_path",
            str(include),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--log_samples",
            "--output_path",
            str(out),
            "--seed",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_in_memory_harness_the_stock_cli_and_our_scorer_agree_item_by_item(tiny_dir, tmp_path):
    include = _mc_task(tmp_path / "tasks", MC_ITEMS)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = EvalConfig(lm_eval_tasks=[MC_TASK], lm_eval_include=str(include), lm_eval_limit=len(MC_ITEMS))

    # (i) our in-memory call
    run = run_harness(model, tok, cfg, seed=0, batch_size=4)[MC_TASK]
    ours_harness = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in run["samples"][MC_TASK]}
    metrics = task_metrics(MC_TASK, run, seed=0)

    # (ii) the stock CLI on the saved directory
    out = _stock_cli(tiny_dir, include, tmp_path / "cli-out", tmp_path)
    [samples_file] = out.rglob(f"samples_{MC_TASK}_*.jsonl")
    cli = {
        s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]]
        for s in map(json.loads, samples_file.read_text().splitlines())
    }
    [results_file] = out.rglob("results_*.json")
    cli_acc = json.loads(results_file.read_text())["results"][MC_TASK]["acc,none"]

    # (iii) our own scorer (finescope_core.evaluate.choice), whose prompt and " " + choice are the task's.
    ours = choice_logprobs(model, tok, MC_ITEMS, max_length=256)
    acc = mc_accuracy(model, tok, MC_ITEMS, max_length=256)

    def pick(row: list[float]) -> int:
        return max(range(len(row)), key=lambda j: (row[j], -j))

    for i in range(len(MC_ITEMS)):
        torch.testing.assert_close(torch.tensor(ours_harness[i]), torch.tensor(ours[i]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(cli[i]), torch.tensor(ours[i]), atol=1e-4, rtol=1e-5)
        assert pick(ours_harness[i]) == pick(cli[i]) == pick(ours[i])
    assert metrics["acc"]["value"] == pytest.approx(cli_acc) == pytest.approx(acc["accuracy"])
    # acc_norm: lm-eval divides by len(choice); mc_accuracy by len(" " + choice) (the text it scores).
    # On lm-eval's convention our log-probs give lm-eval's acc_norm.
    norm = sum(
        pick([s / len(c) for s, c in zip(row, it["choices"], strict=True)]) == it["answer"]
        for row, it in zip(ours, MC_ITEMS, strict=True)
    )
    assert metrics["acc_norm"]["value"] == pytest.approx(norm / len(MC_ITEMS))
    assert metrics["acc"]["n"] == len(MC_ITEMS)


def _greedy(model, tok, prompt: str, max_new: int) -> str:
    """Our own greedy generation of `prompt`, cut at the first newline as the task's `until` says."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def test_generation_exact_match_agrees_with_a_direct_check_of_the_generated_text(tmp_path):
    model, tok = tiny_model(seed=5), byte_tokenizer()
    prompts = [f"Q{i}: what comes after {i}?\nA:" for i in range(8)]
    # Half the targets are the model's own greedy answers, so exact match is 1/2 if lm-eval generated
    # what we generate, and the per-item hits show which items it matched.
    generated = [_greedy(model, tok, p, 6) for p in prompts]
    items = [
        {"prompt": p, "target": g if i % 2 == 0 else "no such answer"}
        for i, (p, g) in enumerate(zip(prompts, generated, strict=True))
    ]
    cfg = EvalConfig(lm_eval_tasks=[GEN_TASK], lm_eval_include=str(_gen_task(tmp_path, items, 6)))
    run = run_harness(model, tok, cfg, seed=0, batch_size=1)[GEN_TASK]
    by_doc = {s["doc_id"]: s for s in run["samples"][GEN_TASK]}
    for i, item in enumerate(items):
        assert by_doc[i]["filtered_resps"][0] == generated[i]
        assert by_doc[i]["exact_match"] == float(generated[i] == item["target"])
    em = task_metrics(GEN_TASK, run, seed=0)["exact_match"]
    assert em["value"] == pytest.approx(
        sum(g == it["target"] for g, it in zip(generated, items, strict=True)) / len(items)
    )
    assert em["n"] == len(items)


def test_the_ci_holds_the_estimate_and_comes_from_the_per_sample_values():
    def results(values: list[float]) -> dict:
        mean = sum(values) / len(values)
        return {
            "results": {"t": {"acc,none": mean, "acc_stderr,none": 0.1}},
            "samples": {"t": [{"doc_id": i, "filter": "none", "acc": v} for i, v in enumerate(values)]},
        }

    spread = task_metrics("t", results([1.0, 0.0] * 10), seed=0)["acc"]
    assert spread["ci"][0] < spread["value"] == 0.5 < spread["ci"][1]
    assert spread["ci"] == list(bootstrap_ci([1.0, 0.0] * 10, seed=0))
    assert spread["n"] == 20 and spread["stderr"] == 0.1
    # Same mean, no spread in the samples: the interval collapses to the value.
    assert task_metrics("t", results([0.5] * 20), seed=0)["acc"]["ci"] == [0.5, 0.5]
    # Seeded: the same values give the same interval; more samples a narrower one.
    assert bootstrap_ci([1.0, 0.0] * 10, seed=0) == bootstrap_ci([1.0, 0.0] * 10, seed=0)
    lo, hi = bootstrap_ci([1.0, 0.0] * 200, seed=0)
    assert hi - lo < spread["ci"][1] - spread["ci"][0]
    for seed in range(5):
        values = [float(v) for v in torch.rand(30, generator=torch.Generator().manual_seed(seed)) > 0.3]
        lo, hi = bootstrap_ci(values, seed=seed)
        assert lo <= sum(values) / len(values) <= hi


def test_harness_metrics_fit_the_metrics_schema(tmp_path):
    include = _mc_task(tmp_path, MC_ITEMS[:4])
    cfg = EvalConfig(lm_eval_tasks=[MC_TASK], lm_eval_include=str(include), max_examples=3)
    lm = harness_metrics(tiny_model(), byte_tokenizer(), cfg, seed=0, batch_size=4)
    assert (
        set(lm[MC_TASK]) == {"acc", "acc_norm"} and lm[MC_TASK]["acc"]["n"] == 3
    )  # max_examples, no limit set
    ppl = {
        "perplexity": 2.0,
        "parameters": 10,
        "n": {"perplexity": 3},
        "ci": {"perplexity": {"value": 2.0, "low": 1.5, "high": 2.5, "n": 3}},
    }
    doc = {"models": {name: {**ppl, "lm_eval": lm} for name in ("base", "pruned", "tuned")}}
    assert metrics_schema_errors(json.loads(json.dumps(doc))) == []
    doc["models"]["base"]["lm_eval"][MC_TASK]["acc"]["ci"] = [0.1]
    assert any("lm_eval" in e for e in metrics_schema_errors(doc))


def test_docs_pick_the_documents_that_run_and_harness_texts_reads_them_in_lm_eval_order(tmp_path):
    """The contamination check's surviving doc ids are what lm-eval scores (cut to the limit)."""
    from finescope_core.evaluate.harness_docs import harness_texts

    include = _mc_task(tmp_path, MC_ITEMS)
    texts = harness_texts(str(include), [MC_TASK, "not_a_task"])
    assert list(texts) == [MC_TASK] and len(texts[MC_TASK]) == len(MC_ITEMS)
    assert texts[MC_TASK][3] == "\n".join([MC_ITEMS[3]["question"], *MC_ITEMS[3]["choices"]])
    cfg = EvalConfig(lm_eval_tasks=[MC_TASK], lm_eval_include=str(include), lm_eval_limit=3)
    samples: dict = {}
    lm = harness_metrics(
        tiny_model(),
        byte_tokenizer(),
        cfg,
        seed=0,
        batch_size=4,
        samples=samples,
        docs={MC_TASK: [1, 4, 6, 7]},
    )
    assert samples[MC_TASK]["acc"]["doc_ids"] == [1, 4, 6] and lm[MC_TASK]["acc"]["n"] == 3


def test_a_missing_include_dir_or_unknown_task_is_refused_naming_the_field(tmp_path):
    with pytest.raises(EvalError, match=r"evaluate\.lm_eval_include: .*missing is not a directory"):
        check_harness_config(EvalConfig(lm_eval_tasks=[MC_TASK], lm_eval_include=str(tmp_path / "missing")))
    include = _mc_task(tmp_path / "tasks", MC_ITEMS)
    with pytest.raises(EvalError, match=r"evaluate\.lm_eval_tasks: \['nope'\] not found .*tiny_mc"):
        check_harness_config(EvalConfig(lm_eval_tasks=[MC_TASK, "nope"], lm_eval_include=str(include)))
    assert check_harness_config(EvalConfig()) is None  # off by default: nothing is imported or checked


def test_include_resolves_against_the_config_file_and_its_content_reaches_the_hash(tmp_path):
    include = _mc_task(tmp_path / "tasks", MC_ITEMS)
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "seeds": ["s.jsonl"],
                "corpus": ["c.jsonl"],
                "evaluate": {"lm_eval_tasks": [MC_TASK], "lm_eval_include": "tasks"},
            }
        )
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.evaluate.lm_eval_include == str(include.resolve())
    before = harness_include_sha(cfg.evaluate.lm_eval_include)
    (include / "mc.jsonl").write_text(json.dumps(MC_ITEMS[0]) + "\n")
    assert harness_include_sha(cfg.evaluate.lm_eval_include) != before


def test_chat_template_runs_equal_the_stock_cli_with_apply_chat_template(tiny_dir, tmp_path):
    """`lm_eval_chat_template: both` runs each task plain (the same as `off`) and with the chat template,
    the latter item by item equal to `lm_eval --apply_chat_template` on the saved directory."""
    include = _mc_task(tmp_path / "tasks", MC_ITEMS)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.chat_template
    cfg = EvalConfig(lm_eval_tasks=[MC_TASK], lm_eval_include=str(include), lm_eval_limit=len(MC_ITEMS))
    plain = run_harness(model, tok, cfg, seed=0, batch_size=4)
    both = run_harness(
        model, tok, cfg.model_copy(update={"lm_eval_chat_template": "both"}), seed=0, batch_size=4
    )
    chat_label = MC_TASK + "@chat"
    assert list(both) == [MC_TASK, chat_label]

    def loglik(run: dict, label: str) -> dict[int, list[float]]:
        return {
            s["doc_id"]: [float(ll) for ll, _ in s["filtered_resps"]] for s in run[label]["samples"][label]
        }

    assert loglik(both, MC_TASK) == loglik(plain, MC_TASK)
    chat = loglik(both, chat_label)
    assert chat != loglik(plain, MC_TASK)  # the template changes what is scored
    prompts = [s["arguments"][0][0] for s in both[chat_label]["samples"][chat_label]]
    assert all(
        p.startswith(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)[:6])
        for p in prompts
    )

    out = _stock_cli(tiny_dir, include, tmp_path / "cli-chat", tmp_path, "--apply_chat_template")
    [samples_file] = out.rglob(f"samples_{MC_TASK}_*.jsonl")
    cli = {
        s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]]
        for s in map(json.loads, samples_file.read_text().splitlines())
    }
    for i in range(len(MC_ITEMS)):
        torch.testing.assert_close(torch.tensor(chat[i]), torch.tensor(cli[i]), atol=1e-4, rtol=1e-5)
    metrics = harness_metrics(
        model, tok, cfg.model_copy(update={"lm_eval_chat_template": "on"}), seed=0, batch_size=4
    )
    assert list(metrics) == [MC_TASK]
    [results_file] = out.rglob("results_*.json")
    assert metrics[MC_TASK]["acc"]["value"] == pytest.approx(
        json.loads(results_file.read_text())["results"][MC_TASK]["acc,none"]
    )


def test_chat_template_without_one_in_the_tokenizer_is_refused_naming_the_field(tiny_dir, tmp_path):
    include = _mc_task(tmp_path / "tasks", MC_ITEMS)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = None
    cfg = EvalConfig(lm_eval_tasks=[MC_TASK], lm_eval_include=str(include), lm_eval_chat_template="on")
    with pytest.raises(EvalError, match="lm_eval_chat_template"):
        run_harness(AutoModelForCausalLM.from_pretrained(tiny_dir), tok, cfg)

"""The flows' own export: a CLI run and a deployment-style run produce the same outputs, which drop into the
Hugging Face ecosystem (cards, an adapter that finds its base, loadable datasets), and the Prefect UI
gets a report whose plots render and artifacts namespaced by the run's name."""

import base64
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from test_specialize_flow import config, workspace  # noqa: F401  (the module-scoped tiny workspace)
from transformers import AutoModelForCausalLM

from flows.cli import main
from flows.specialize import specialize_flow

RELATIVE_IMAGE = re.compile(r"!\[[^\]]*\]\((?!data:)[^)]*\)")


@pytest.fixture(scope="module")
def cli_run(workspace, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("outputs")
    cfg = config(workspace)
    cfg_file = root / "math.yaml"
    cfg_file.write_text(cfg.model_dump_json())
    out = root / "out"
    assert main(["run", "--config", str(cfg_file), "--out", str(out)]) == 0
    return cfg, out


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_deployment_runs_export_what_cli_runs_export(cli_run, workspace):  # noqa: F811
    cfg, out = cli_run
    served = config(workspace).model_copy(update={"name": "math"})  # as a deployment runs it: no --out
    result = specialize_flow(served)
    default = workspace / "store" / "outputs" / "math"
    assert result.exported.location == str(default)
    assert _tree(default) == _tree(out)
    expected = {
        "run.json",
        "report.md",
        "metrics.json",
        "pruned-model/README.md",
        "tuned-model/README.md",
        "tuned-adapter/README.md",
        "tuned-adapter/adapter_config.json",
        "distilled/distilled.jsonl",
        "distilled/README.md",
        "curated/curated.jsonl",
        "curated/curated.parquet",
        "curated/README.md",
    }
    assert expected <= set(_tree(out))
    run = json.loads((out / "run.json").read_text())
    assert run["flow"] == "specialize" and run["name"] == "math"
    assert set(run["outputs"]) >= {
        "pruned-model",
        "tuned-model",
        "tuned-adapter",
        "distilled/distilled.jsonl",
        "run.json",
    }
    assert run["outputs"]["tuned-model"] == str(out / "tuned-model")
    assert {"curated", "pruned", "distilled", "tuned", "report"} <= set(run["stages"])


def test_adapter_finds_its_base_and_matches_the_merged_model(cli_run):
    from peft import AutoPeftModelForCausalLM

    _, out = cli_run
    assert json.loads((out / "tuned-adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(out / "pruned-model")
    adapted = AutoPeftModelForCausalLM.from_pretrained(out / "tuned-adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "tuned-model").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_model_cards_carry_base_pruning_and_metrics(cli_run):
    cfg, out = cli_run
    metrics = json.loads((out / "metrics.json").read_text())["models"]
    run = json.loads((out / "run.json").read_text())
    for kind, key in (("pruned-model", "pruned"), ("tuned-model", "tuned")):
        card = ModelCard.load(out / kind / "README.md")
        assert card.data.library_name == "transformers" and "finescope" in card.data.tags
        assert card.data.base_model is None  # the tiny base is a local directory, not a hub id
        [result] = [r for r in card.data.eval_results if r.metric_name == "perplexity"]
        assert result.metric_value == pytest.approx(metrics[key]["perplexity"], abs=1e-4)
        info = run["stages"]["pruned"]["info"]
        assert (
            f"{info['params_before']['total']:,}" in card.text
            and f"{info['achieved_ratio']:.4f}" in card.text
        )
    assert ModelCard.load(out / "tuned-adapter" / "README.md").data.library_name == "peft"


def test_exported_datasets_load_with_datasets_and_match_their_cards(cli_run, tmp_path):
    from datasets import load_dataset

    _, out = cli_run
    for name, source in (("curated", "curated.jsonl"), ("distilled", "distilled.jsonl")):
        card = DatasetCard.load(out / name / "README.md")
        assert card.data.configs[0]["data_files"][0]["path"] == [source]
        # a fresh cache: datasets' cache of a folder named `distilled` can hold an earlier run's rows
        ds = load_dataset(str(out / name), split="train", cache_dir=str(tmp_path / "hf-cache"))
        # split on "\n" only: str.splitlines would also split inside texts holding \x1c, \x85, \u2028...
        lines = (out / name / source).read_text(encoding="utf-8").rstrip("\n").split("\n")
        assert len(ds) == len(lines) and f"{len(lines):,} records" in card.text
        assert ds[0]["id"] == json.loads(lines[0])["id"]


def _artifact(key):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key}"
    return found[0]


def test_report_artifact_embeds_its_plots_and_keys_are_namespaced(cli_run):
    _, out = cli_run
    report = _artifact("specialize-math-report").data
    assert RELATIVE_IMAGE.findall(report) == []
    images = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([^)]+)\)", report)
    assert len(images) == 5 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    rows = json.loads(_artifact("specialize-math-outputs").data)  # the latest run's (either test's)
    by_name = {r["output"]: r["uri"] for r in rows}
    assert {"tuned-model", "tuned-adapter", "pruned-model", "run.json"} <= set(by_name)
    assert all(Path(uri).exists() for uri in by_name.values())
    for key in ("specialize-math-evaluation", "curate-math-curated-set", "curate-math-stages"):
        _artifact(key)


@pytest.mark.parametrize("folder", ["tuned-model", "pruned-model", "tuned-adapter"])
def test_each_model_cards_use_snippet_runs_as_written(cli_run, folder, monkeypatch):
    """The card's "Use" code is what a user pastes: run it, from the output directory, as it stands."""
    _, out = cli_run
    card = (out / folder / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    monkeypatch.chdir(out)
    namespace: dict = {}
    exec(
        compile(code.replace("max_new_tokens=128", "max_new_tokens=3"), f"{folder}/README.md", "exec"),
        namespace,
    )
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]  # it generated

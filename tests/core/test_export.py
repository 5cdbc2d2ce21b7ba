"""Exported outputs: whole replacement, extra files, remote targets; HF cards that parse back;
inline plots."""

import base64

import fsspec
import pytest
from huggingface_hub import DatasetCard, ModelCard

from finescope_core.cards import RunFacts, base_model_id, dataset_card, model_card
from finescope_core.export import ExportError, Output, export_outputs
from finescope_core.report import ReportError, embed_images

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def _model_dir(path, marker: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(marker)
    (path / "README.md").write_text("old card")
    return path


def test_a_directory_output_is_replaced_whole_with_its_extra_files(tmp_path):
    dest = tmp_path / "out"
    export_outputs([Output("model", source=_model_dir(tmp_path / "v1", "1"))], str(dest))
    (dest / "model" / "stale.bin").write_text("left from an older export")
    written = export_outputs(
        [Output("model", source=_model_dir(tmp_path / "v2", "2"), files={"README.md": "card"})], str(dest)
    )
    assert written == {"model": str(dest / "model")}
    assert sorted(p.name for p in (dest / "model").iterdir()) == ["README.md", "config.json"]
    assert (dest / "model" / "config.json").read_text() == "2" and (
        dest / "model" / "README.md"
    ).read_text() == "card"
    assert [p.name for p in dest.iterdir()] == ["model"]  # no temporary or old copies left behind
    assert (tmp_path / "v2" / "README.md").read_text() == "old card"  # the source is never touched


def test_text_and_nested_outputs(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text("{}\n")
    written = export_outputs(
        [Output("sub/data.jsonl", source=src), Output("sub/README.md", text="hello")], str(tmp_path / "o")
    )
    assert (tmp_path / "o" / "sub" / "README.md").read_text() == "hello"
    assert set(written) == {"sub/data.jsonl", "sub/README.md"}


def test_bad_outputs_are_refused_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file; give a directory"):
        export_outputs([Output("a", text="x")], str(tmp_path / "file"))
    with pytest.raises(FileNotFoundError, match="output m: its source"):
        export_outputs([Output("a", text="x"), Output("m", source=tmp_path / "missing")], str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_remote_outputs_replace_the_old_directory(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/runs/x/model/stale.bin", b"old")
    model = _model_dir(tmp_path / "m", "9")
    written = export_outputs([Output("model", source=model, files={"README.md": "card"})], "memory://runs/x")
    assert written == {"model": "memory://runs/x/model"}
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find("/runs/x")) == ["README.md", "config.json"]
    assert fs.cat("/runs/x/model/README.md") == b"card"


def _facts(**kw) -> RunFacts:
    metrics = {
        "models": {
            "base": {"perplexity": 7.0, "parameters": 1000, "n": {"perplexity": 18}},
            "pruned": {"perplexity": 19.0, "parameters": 700, "mc_accuracy": 0.4},
            "tuned": {"perplexity": 12.5, "parameters": 700, "mc_accuracy": 0.5},
        }
    }
    prune = {
        "params_before": {"total": 1000},
        "params_after": {"total": 700},
        "achieved_ratio": 0.3,
        "target_ratio": 0.3,
    }
    return RunFacts(
        **{
            "name": "math",
            "base_model": "default",
            "base_model_id": base_model_id("default", False),
            "method": "sae",
            "code_version": "0.1.0",
            "curated_records": 100,
            "prune": prune,
            "metrics": metrics,
            **kw,
        }
    )


def test_model_cards_parse_back_with_base_and_metrics():
    card = ModelCard(model_card("tuned", _facts()))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers" and "lora" in card.data.tags
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"perplexity": 12.5, "mc_accuracy": 0.5}
    assert "300 of 1,000 parameters" in card.text and "| tuned | 12.5 |" in card.text
    pruned = ModelCard(model_card("pruned", _facts()))
    assert {r.metric_name: r.metric_value for r in pruned.data.eval_results}["perplexity"] == 19.0
    adapter = ModelCard(model_card("adapter", _facts()))
    assert adapter.data.library_name == "peft" and "PeftModel.from_pretrained" in adapter.text


def test_a_card_without_metrics_says_so():
    card = ModelCard(model_card("pruned", _facts(metrics=None)))
    assert card.data.eval_results is None and "Not evaluated in this run." in card.text


def test_base_model_ids():
    assert base_model_id("default", False) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("Qwen/Qwen3-8B", False) == "Qwen/Qwen3-8B"
    assert base_model_id("models/local", True) is None and base_model_id("/abs/dir/model", False) is None


def test_dataset_card_points_datasets_at_its_file():
    card = DatasetCard(dataset_card("curated", _facts(), 1234, ["curated.jsonl"], ["id", "text", "rank"]))
    assert card.data.size_categories == "1K<n<10K" and card.data.pretty_name == "math (curated)"
    assert card.data.configs == [
        {"config_name": "default", "data_files": [{"split": "train", "path": ["curated.jsonl"]}]}
    ]
    assert "1,234 records" in card.text and "`rank`" in card.text


def test_embed_images_inlines_relative_pngs_only(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    md = "# r\n\n![a](a.png)\n\n![web](https://x/y.png) ![inline](data:image/png;base64,AAAA)\n"
    out = embed_images(md, tmp_path)
    assert f"![a](data:image/png;base64,{base64.b64encode(PNG).decode()})" in out
    assert "![web](https://x/y.png)" in out and "![inline](data:image/png;base64,AAAA)" in out


def test_embed_images_refuses_missing_or_non_png(tmp_path):
    with pytest.raises(ReportError, match="missing.png does not exist"):
        embed_images("![m](missing.png)", tmp_path)
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ReportError, match="is not a PNG"):
        embed_images("![f](fake.png)", tmp_path)


def test_tuned_card_says_how_the_model_was_tuned() -> None:
    lora, full = model_card("tuned", _facts()), model_card("tuned", _facts(tuning="full"))
    assert "adapter merged in" in lora and "- lora" in lora
    assert "all of its weights tuned" in full and "adapter" not in full and "- lora" not in full

import pytest

from finescope_core.config import ConfigError, FinescopeConfig, load_config


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path):
    (tmp_path / "c.yaml").write_text("seeds: s.jsonl\ncorpus: [data/c.jsonl, s3://b/x.parquet]\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.seeds == [str(tmp_path / "s.jsonl")]
    assert cfg.corpus == [str(tmp_path / "data/c.jsonl"), "s3://b/x.parquet"]
    assert cfg.model == "default" and cfg.curate.method == "sae" and cfg.curate.final_size == 100


def test_overrides_apply_dotted_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("seeds: [s]\ncorpus: [c]\n")
    cfg = load_config(tmp_path / "c.yaml", {"curate.top_m": 7, "curate.sae.steps": 3, "model": "/m"})
    assert (cfg.curate.top_m, cfg.curate.sae.steps, cfg.model) == (7, 3, "/m")


@pytest.mark.parametrize(
    "text, message",
    [
        ("seeds: [s]\ncorpus: [c]\ncurate: {topm: 3}\n", "curate.topm: unknown field"),
        (
            "seeds: [s]\ncorpus: [c]\ncurate: {method: svm}\n",
            "curate.method: Input should be 'sae', 'sentence'",
        ),
        (
            "seeds: [s]\ncorpus: [c]\ncurate: {final_size: 0}\n",
            "curate.final_size: Input should be greater than or equal to 1",
        ),
        ("seeds: [s]\ncorpus: [c]\nprune: {ratio: 1.5}\n", "prune.ratio: Input should be less than 1"),
        ("corpus: [c]\n", "seeds: Field required"),
        ("seeds: []\ncorpus: [c]\n", "seeds: Value error, give at least one file"),
        ("- a\n- b\n", "must hold a mapping"),
        ("seeds: [s\n", "is not valid YAML"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(tmp_path / "c.yaml")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_credentials_in_the_config_are_refused_with_the_fix(tmp_path):
    (tmp_path / "c.yaml").write_text("seeds: [s]\ncorpus: [c]\nstorage: {key: AKIA123, secret: topsecret}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    message = str(err.value)
    assert "storage.key and storage.secret: credentials are not read from the config" in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "storage.secret_block" in message
    assert "topsecret" not in message and "AKIA123" not in message


def test_block_credentials_reach_fsspec_options_only_when_given():
    storage = FinescopeConfig(seeds=["s"], corpus=["c"], storage={"endpoint_url": "http://h:1"}).storage
    assert storage.fsspec_options() == {"client_kwargs": {"endpoint_url": "http://h:1"}}
    opts = storage.fsspec_options({"key": "k", "secret": "s"})
    assert opts == {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://h:1"}}


def test_every_path_field_is_resolved_against_the_config_file(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "c.yaml").write_text(
        "seeds: [s.jsonl]\ncorpus: c.jsonl\nstore: st\noutput: out\nmodel: models/m\n"
        "teacher: {model: models/m}\nprune: {data: p.jsonl}\n"
        "evaluate: {eval_file: e.jsonl, mc_file: mc.jsonl, numeric_file: n.jsonl}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.seeds == [str(tmp_path / "s.jsonl")] and cfg.corpus == [str(tmp_path / "c.jsonl")]
    assert (cfg.store, cfg.output) == (str(tmp_path / "st"), str(tmp_path / "out"))
    assert cfg.model == cfg.teacher.model == str(tmp_path / "models" / "m")
    assert (cfg.evaluate.eval_file, cfg.evaluate.mc_file, cfg.evaluate.numeric_file) == tuple(
        str(tmp_path / n) for n in ("e.jsonl", "mc.jsonl", "n.jsonl")
    )
    # A name or hub id is not a path: prune.data p.jsonl does not exist there, so it stays as written.
    assert cfg.prune.data == "p.jsonl"


def test_keywords_hub_ids_and_uris_are_left_alone(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "seeds: [s3://b/s.jsonl]\ncorpus: [/abs/c.jsonl]\nmodel: org/model\nteacher: {model: base}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.seeds, cfg.corpus, cfg.model, cfg.teacher.model, cfg.prune.data) == (
        ["s3://b/s.jsonl"],
        ["/abs/c.jsonl"],
        "org/model",
        "base",
        "curated",
    )


def test_path_fields_cover_every_field_that_names_a_file():
    """A new file-like field must carry the PATH marker, or a config file elsewhere breaks it."""
    from finescope_core.config import path_fields

    fields = path_fields()
    for dotted in (
        "seeds",
        "corpus",
        "store",
        "output",
        "model",
        "teacher.model",
        "prune.data",
        "evaluate.eval_file",
        "evaluate.mc_file",
        "evaluate.numeric_file",
    ):
        assert dotted in fields
    suspicious = [
        d for d, _ in _leaf(FinescopeConfig) if d.endswith(("_file", "_dir", "path")) and d not in fields
    ]
    assert suspicious == []


def _leaf(model, prefix=""):
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _leaf(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def test_slug_makes_run_names():
    from finescope_core.config import slug

    assert slug("My Math_v2") == "my-math-v2"
    assert slug("...") is None


def test_override_paths_stay_relative_to_the_working_directory(tmp_path):
    (tmp_path / "c.yaml").write_text("seeds: [s.jsonl]\ncorpus: [c.jsonl]\n")
    cfg = load_config(tmp_path / "c.yaml", {"seeds": ["out/demo/seeds.jsonl"]})
    assert cfg.seeds == ["out/demo/seeds.jsonl"]
    assert cfg.corpus == [str(tmp_path / "c.jsonl")]


def test_every_shipped_config_validates():
    """configs/*.yaml (the demo's and the quality benchmark's) are valid configs as shipped."""
    from pathlib import Path

    from finescope_core.config import load_config

    shipped = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"demo.yaml", "quality.yaml"}
    for path in shipped:
        cfg = load_config(path, {"seeds": ["s.jsonl"], "corpus": ["c.jsonl"]})
        assert cfg.model == "default", path


def test_renamed_finetune_fields_still_load_with_a_warning_naming_the_new_one(caplog) -> None:
    import logging

    from finescope_core.config import FinetuneConfig

    with caplog.at_level(logging.WARNING, logger="finescope"):
        cfg = FinetuneConfig(cutoff=96, temperature=2.0)
    assert (cfg.max_length, cfg.kd_temperature) == (96, 2.0)
    assert "finetune.cutoff is now finetune.max_length" in caplog.text
    assert "finetune.temperature is now finetune.kd_temperature" in caplog.text
    with pytest.raises(ValueError, match="one setting"):
        FinetuneConfig(cutoff=96, max_length=128)

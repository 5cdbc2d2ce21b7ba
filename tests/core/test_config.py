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
        ("seeds: [s]\ncorpus: [c]\ncurate: {method: svm}\n", "curate.method: Input should be 'sae', 'sentence'"),
        ("seeds: [s]\ncorpus: [c]\ncurate: {final_size: 0}\n", "curate.final_size: Input should be greater than or equal to 1"),
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


def test_secrets_are_masked_in_dumps():
    cfg = FinescopeConfig(seeds=["s"], corpus=["c"], storage={"key": "AKIA123", "secret": "topsecret"})
    dumped = cfg.model_dump_json()
    assert "topsecret" not in dumped and "AKIA123" not in dumped
    assert cfg.storage.fsspec_options()["secret"] == "topsecret"


def test_override_paths_stay_relative_to_the_working_directory(tmp_path):
    (tmp_path / "c.yaml").write_text("seeds: [s.jsonl]\ncorpus: [c.jsonl]\n")
    cfg = load_config(tmp_path / "c.yaml", {"seeds": ["out/demo/seeds.jsonl"]})
    assert cfg.seeds == ["out/demo/seeds.jsonl"]
    assert cfg.corpus == [str(tmp_path / "c.jsonl")]

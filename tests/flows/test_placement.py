"""A run never replaces the outputs of a run with other settings: it writes beside them (`<location>-<hash>`,
named `<name>-<hash>`) and says which settings differ; the same settings replace their own outputs."""

import logging

import pytest
from test_specialize_flow import config, write_workspace

from finescope_core.config import ConfigError
from finescope_core.settings import differences, settings, settings_hash
from flows.curate import curate_flow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("placement"))


def _cfg(root, **curate):
    cfg = config(root).model_copy(update={"name": "math"})
    cfg.curate = cfg.curate.model_copy(update={"method": "random", **curate})
    return cfg


def test_settings_leave_out_where_and_how_a_run_goes(workspace):
    cfg = _cfg(workspace)
    moved = cfg.model_copy(update={"name": "other", "store": "/elsewhere", "output": "/out"})
    moved.orchestration.workers = 7
    assert settings_hash(moved) == settings_hash(cfg) and len(settings_hash(cfg)) == 8
    other = _cfg(workspace, final_size=20)
    assert differences(settings(cfg), settings(other)) == ["curate.final_size: 30 -> 20"]
    # a config read back from run.json compares equal to the one that wrote it
    assert settings(cfg.model_dump(mode="json")) == settings(cfg)


def test_other_settings_go_beside_and_the_same_settings_replace_their_own(workspace, caplog):
    first = curate_flow(_cfg(workspace))
    home = workspace / "store" / "outputs" / "math"
    assert first.exported.location == str(home)
    before = (home / "run.json").read_bytes()

    variant = _cfg(workspace, final_size=20)
    with caplog.at_level(logging.WARNING):
        moved = curate_flow(variant)
    beside = home.with_name(f"math-{settings_hash(variant)}")
    assert moved.exported.location == str(beside) and (beside / "curated.jsonl").is_file()
    assert (home / "run.json").read_bytes() == before  # the first run's outputs are untouched
    [said] = [r.getMessage() for r in caplog.records if "writes beside them" in r.getMessage()]
    assert "curate.final_size: 30 -> 20" in said and str(beside) in said

    again = curate_flow(_cfg(workspace, final_size=20))  # the same variant lands in the same place
    assert again.exported.location == str(beside)
    runner = variant.orchestration.model_copy(update={"workers": 3})
    same = curate_flow(_cfg(workspace).model_copy(update={"orchestration": runner}))
    assert same.exported.location == str(home)  # another runner is not another setting


def test_an_explicit_output_gets_the_hash_suffix_and_the_artifacts_the_new_name(workspace, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    out = tmp_path / "out"
    curate_flow(_cfg(workspace).model_copy(update={"output": str(out)}))
    variant = _cfg(workspace, final_size=25).model_copy(update={"output": str(out)})
    moved = curate_flow(variant)
    suffix = settings_hash(variant)
    assert moved.exported.location == f"{out}-{suffix}"
    key = f"curate-math-{suffix}-curated-set"
    with get_client(sync_client=True) as client:
        by_key = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        [artifact] = client.read_artifacts(artifact_filter=by_key, limit=1)
    assert (
        f"random curation, prune.ratio 0.2, baselines random, model {variant.model}, settings {suffix}"
        in (artifact.description)
    )


def test_an_unreadable_run_json_is_refused_before_any_work(workspace, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"run.json is not a finescope run.json .*give another `output`"):
        curate_flow(_cfg(workspace).model_copy(update={"output": str(out)}))
    assert [p.name for p in out.iterdir()] == ["run.json"] and (out / "run.json").read_text() == "{not json"

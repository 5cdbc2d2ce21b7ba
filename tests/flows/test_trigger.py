"""`finescope trigger` against the test server (conftest.py): a deployment run with one field changed, bad
changes refused before any run exists; and progress artifacts that show their value."""

import contextlib
import uuid

import pytest
from prefect import flow, task
from test_specialize_flow import config

from finescope_core.config import FinescopeConfig
from flows.cli import main
from flows.serve import build_deployment
from tasks.progress import Progress


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A registered (not served) curate deployment with a unique name, and its config."""
    root = tmp_path_factory.mktemp("trigger")
    (root / "seeds.jsonl").write_text('{"text": "a"}\n')
    (root / "corpus.jsonl").write_text('{"text": "b"}\n')
    cfg = config(root).model_copy(update={"name": f"t-{uuid.uuid4().hex[:8]}"})
    build_deployment(cfg, "curate", name=cfg.name).apply()
    return f"curate/{cfg.name}", cfg


def _runs(name):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(name)
        of_it = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))
        return client.read_flow_runs(flow_run_filter=of_it)


def test_trigger_starts_a_run_with_one_field_changed(deployment, capsys):
    name, cfg = deployment
    assert main(["trigger", name, "--prune.ratio", "0.5", "--curate.top_m", "12"]) == 0
    out = capsys.readouterr().out
    [run] = _runs(name)
    assert (
        f"started flow run '{run.name}' ({run.id}) of {name} with curate.top_m=12, prune.ratio=0.5; UI: "
        in out
    )
    assert out.rstrip().endswith(f"/runs/flow-run/{run.id}")
    sent = FinescopeConfig.model_validate(run.parameters["config"])
    assert (sent.prune.ratio, sent.curate.top_m) == (0.5, 12)
    expected = cfg.model_copy(deep=True)
    expected.prune.ratio, expected.curate.top_m = 0.5, 12
    assert sent == expected  # every other field is the deployment's own
    # the bare deployment name finds it too, when no other flow has a deployment of that name
    assert main(["trigger", name.split("/")[1]]) == 0 and len(_runs(name)) == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prune.ratio", "7"], "--prune.ratio: Input should be less than"),
        (["--curate.method", "magic"], "invalid choice: 'magic'"),
    ],
)
def test_bad_changes_are_refused_before_any_run(deployment, capsys, args, expected):
    name, _ = deployment
    before = len(_runs(name))
    with (
        pytest.raises(SystemExit) if "choice" in expected else contextlib.nullcontext()
    ):  # argparse exits on a bad choice
        assert main(["trigger", name, *args]) == 2
    assert expected in capsys.readouterr().err
    assert len(_runs(name)) == before


def test_an_unknown_deployment_is_named(capsys):
    assert main(["trigger", "curate/no-such-thing"]) == 2
    assert (
        "no deployment 'curate/no-such-thing' on this Prefect server; `prefect deployment ls`"
        in capsys.readouterr().err
    )


@task
def _counting():
    progress = Progress("counting")
    for i in range(1, 6):
        progress(i, 5)


@flow
def _progress_flow():
    _counting()


def test_progress_artifacts_show_the_value_in_their_description():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    state = _progress_flow(return_state=True)
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                type=ArtifactFilterType(any_=["progress"]),
            )
        )
    assert artifact.data == 100.0 and artifact.description == "counting: 100 % (5/5)"

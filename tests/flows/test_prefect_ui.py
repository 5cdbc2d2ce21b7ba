"""What the Prefect UI gets from a CLI run of `specialize`, read back from the test server (the harness of
conftest.py): every task run listed (no `flow_run` inputs, which the UI refuses), every flow and task run
named by what it does, and the run's tags."""

import uuid
from collections import Counter

import pytest
from test_specialize_flow import config, write_workspace

from flows.cli import main


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("ui"))
    name = f"ui-{uuid.uuid4().hex[:8]}"  # a tag of this run alone on the shared test server
    cfg_file = root / f"{name}.yaml"
    cfg_file.write_text(config(root).model_dump_json())
    assert main(["run", "--config", str(cfg_file), "--out", str(root / "out")]) == 0
    return name


def _runs(name):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, TaskRunFilter, TaskRunFilterTags

    with get_client(sync_client=True) as client:
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[name])))
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[name])), limit=200)
    return flows, tasks


def test_no_task_run_has_a_flow_run_input(cli_run):
    flows, tasks = _runs(cli_run)
    assert len(tasks) > 20 and {f.flow_id for f in flows}
    found = [(t.name, arg) for t in tasks for arg, inputs in t.task_inputs.items()
             for i in inputs if i.input_type == "flow_run"]  # fmt: skip
    assert found == []
    # The inputs that link stages are still recorded, as task runs: the report gets the pruned model's manifest.
    [report] = [t for t in tasks if t.name.startswith("report")]
    assert {i.input_type for i in report.task_inputs["pruned"]} == {"task_run"}


def test_flow_and_task_runs_are_named_and_tagged(cli_run):
    flows, tasks = _runs(cli_run)
    assert {f.name for f in flows} >= {f"{cli_run}-sae-r0.2", f"{cli_run}-sae", "sae-training", "sae-codes"}
    assert all({"finescope", cli_run} <= set(r.tags) for r in [*flows, *tasks])
    names = {t.name for t in tasks}
    variants = {f"{stage}-{tag}" for stage in ("prune", "teacher", "finetune") for tag in ("curated", "random")}
    evaluations = {f"evaluate-{m}" for m in ("base", "pruned", "tuned", "pruned-random", "tuned-random")}
    assert variants | evaluations <= names
    # Within one flow run no two task runs share a name.
    assert Counter((t.flow_run_id, t.name) for t in tasks).most_common(1)[0][1] == 1

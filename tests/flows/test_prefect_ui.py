"""What the Prefect UI gets from a CLI run of `specialize`, read back from the test server (the harness of
conftest.py): every task run listed (no `flow_run` inputs, which the UI refuses), every flow and task run
named by what it does, the run's tags, its warnings in the log and the report, and stage seconds."""

import json
import uuid
from collections import Counter

import pytest
from test_specialize_flow import config, write_workspace

from flows.cli import main


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("ui"))
    # 4 exact copies (up to case and spaces) under new ids: the corpus stage removes them.
    copies = [
        {"id": f"dup{i}", "instruction": f"what is {i}  plus {i + 1}?", "output": f"{2 * i + 1}"}
        for i in range(4)
    ]
    with open(root / "corpus.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in copies))
    name = f"ui-{uuid.uuid4().hex[:8]}"  # a tag of this run alone on the shared test server
    cfg_file = root / f"{name}.yaml"
    cfg_file.write_text(config(root).model_dump_json())
    assert main(["run", "--config", str(cfg_file), "--out", str(root / "out")]) == 0
    return name, root / "out"


def _runs(name):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterTags,
    )

    with get_client(sync_client=True) as client:
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[name])))
        one_run = TaskRunFilter(tags=TaskRunFilterTags(all_=[name]))
        tasks = client.read_task_runs(task_run_filter=one_run, limit=200)
    return flows, tasks


def test_no_task_run_has_a_flow_run_input(cli_run):
    flows, tasks = _runs(cli_run[0])
    assert len(tasks) > 20 and {f.flow_id for f in flows}
    found = [
        (t.name, arg)
        for t in tasks
        for arg, inputs in t.task_inputs.items()
        for i in inputs
        if i.input_type == "flow_run"
    ]
    assert found == []
    # Inputs that link stages are still recorded, as task runs: the report gets the pruned model's manifest.
    [report] = [t for t in tasks if t.name.startswith("report")]
    assert {i.input_type for i in report.task_inputs["pruned"]} == {"task_run"}


def test_flow_and_task_runs_are_named_and_tagged(cli_run):
    name = cli_run[0]
    flows, tasks = _runs(name)
    assert {f.name for f in flows} >= {f"{name}-sae-r0.2", f"{name}-sae", "sae-training", "sae-codes"}
    assert all({"finescope", name} <= set(r.tags) for r in [*flows, *tasks])
    names = {t.name for t in tasks}
    stages, tags = ("pruned", "distilled", "tuned"), ("curated", "random")
    variants = {f"{stage}-{tag}" for stage in stages for tag in tags}
    evaluations = {f"evaluation-{m}" for m in ("base", "pruned", "tuned", "pruned-random", "tuned-random")}
    assert variants | evaluations <= names
    # Within one flow run no two task runs share a name.
    assert Counter((t.flow_run_id, t.name) for t in tasks).most_common(1)[0][1] == 1


def _warning_logs(flows):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[f.id for f in flows]), level=LogFilterLevel(ge_=30)
            )
        )
    return [log.message for log in logs]


def test_warnings_reach_the_log_and_the_top_of_the_report(cli_run):
    name, out = cli_run
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    warnings = metrics["warnings"]
    assert "corpus: 4 of 84 records (5 %) removed as exact duplicates" in warnings[0]
    # the tiny evaluation split is far under 30 items; every fallback count is the distilled stage's own
    evaluation = metrics["evaluation"]
    small = f"evaluation: the domain set has {evaluation['domain']['kept']} items"
    assert any(w.startswith(small) for w in warnings)
    fell_back = metrics["distillation"]["curated"]["fell_back_to_reference"]
    assert any(w.startswith(f"teacher (curated): {fell_back} of ") for w in warnings) == (fell_back > 0)
    # first section of the report, every warning listed
    assert report.split("\n## ")[1].startswith("Warnings\n") and all(f"- {w}" in report for w in warnings)
    logged = _warning_logs(_runs(name)[0])
    assert [w for w in warnings if w not in logged] == []


def test_fanned_out_stages_report_their_parts_seconds(cli_run):
    seconds = json.loads((cli_run[1] / "metrics.json").read_text())["stage_seconds"]
    # The gathering steps alone take a few milliseconds (0.0 once rounded); the shards' work is what counts.
    assert seconds["activations-corpus"] > 0 and seconds["sae"] > 0

"""`finescope serve`: the deployment it builds, what it refuses before serving, and a real served run."""

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from finescope_core.config import FinescopeConfig
from finescope_core.tiny import save_tiny
from flows.cli import main
from flows.serve import build_deployment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny(root / "model", "qwen3", hidden=48, layers=3, intermediate=96)
    rows = [{"id": f"m{i}", "text": f"What is {i} plus {i % 7}?"} for i in range(30)]
    rows += [{"id": f"c{i}", "text": f"Good morning, friend number {i}."} for i in range(30)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "seeds.jsonl").write_text(json.dumps({"id": "s0", "text": "What is 2 plus 2?"}) + "\n")
    return root


def config(ws: Path, store: Path) -> dict:
    return {
        "model": str(ws / "model"),
        "seeds": [str(ws / "seeds.jsonl")],
        "corpus": [str(ws / "corpus.jsonl")],
        "store": str(store),
        "device": "cpu",
        "curate": {
            "final_size": 10,
            "top_m": 10,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "batch_size": 8,
            "sae": {"d_sae": 32, "steps": 10, "batch_size": 16},
        },
    }


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("flow_name", ["specialize", "curate", "prune"])
def test_cron_deployment_carries_the_config(ws, tmp_path, flow_name):
    cfg = FinescopeConfig.model_validate(config(ws, tmp_path / "store"))
    cfg.storage.endpoint_url = "http://127.0.0.1:9000"  # not a secret: may travel in the parameters
    dep = build_deployment(cfg, flow_name, cron="0 3 * * 0", name="weekly")
    assert (dep.flow_name, dep.name, dep.tags) == (flow_name, "weekly", ["finescope", "weekly"])
    assert (
        dep.entrypoint
        == {
            "specialize": "flows.specialize.specialize_flow",
            "curate": "flows.curate.curate_flow",
            "prune": "flows.prune.prune_flow",
        }[flow_name]
    )
    [sched] = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("0 3 * * 0", "UTC", True)
    assert set(dep.parameters) == {"config"}
    sent = json.loads(json.dumps(dep.parameters["config"]))  # what the API stores
    assert FinescopeConfig.model_validate(sent) == cfg


def test_interval_and_unscheduled_deployments(ws, tmp_path):
    cfg = FinescopeConfig.model_validate(config(ws, tmp_path / "store"))
    [sched] = build_deployment(cfg, "curate", interval=3600, name="hourly").schedules
    assert sched.schedule.interval == datetime.timedelta(hours=1)
    assert build_deployment(cfg, "curate", name="on-demand").schedules == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--cron", "0 3 * *"], ["--cron '0 3 * *' is not a valid cron string", "--cron '0 3 * * 0'"]),
        (["--cron", "61 3 * * 0"], ["--cron '61 3 * * 0' is not a valid cron string"]),
        (["--cron", "0 3 * * 0", "--interval", "60"], ["--cron and --interval both given", "pass only one"]),
        (["--interval", "0"], ["--interval 0 must be a positive number of seconds"]),
        (["--name", "a/b"], ["name: String should match pattern"]),
    ],
)
def test_bad_options_exit_2_before_any_work(ws, tmp_path, capsys, args, expected):
    cfg_file = write_config(tmp_path / "c.yaml", config(ws, tmp_path / "store"))
    assert main(["serve", "--config", cfg_file, "--flow", "curate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finescope: error: ")
    for text in expected:
        assert text in err
    assert not (tmp_path / "store").exists()


def test_secrets_in_the_config_file_are_refused(ws, tmp_path, capsys):
    cfg = config(ws, tmp_path / "store") | {"storage": {"key": "AKIAEXAMPLE", "secret": "hunter2"}}
    cfg_file = write_config(tmp_path / "c.yaml", cfg)
    assert main(["serve", "--config", cfg_file, "--cron", "0 3 * * 0"]) == 2
    err = capsys.readouterr().err
    assert "storage.key and storage.secret: credentials are not read from the config" in err
    assert "Prefect database" in err and "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err
    assert "hunter2" not in err and "AKIAEXAMPLE" not in err
    assert not (tmp_path / "store").exists()


def test_bad_config_exits_2(ws, tmp_path, capsys):
    cfg_file = write_config(tmp_path / "c.yaml", config(ws, tmp_path / "store") | {"curate": {"top_mm": 3}})
    assert main(["serve", "--config", cfg_file, "--cron", "0 3 * * 0"]) == 2
    assert "curate.top_mm: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_no_prefect_api_exits_2_with_the_steps(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    cfg_file = write_config(tmp_path / "c.yaml", config(ws, tmp_path / "store"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--config", cfg_file, "--cron", "0 3 * * 0"]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in err
    assert "prefect server start" in err and "export PREFECT_API_URL=http://127.0.0.1:4200/api" in err
    assert not (tmp_path / "store").exists()


def test_unreachable_prefect_api_exits_2(ws, tmp_path, capsys):
    cfg_file = write_config(tmp_path / "c.yaml", config(ws, tmp_path / "store"))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["serve", "--config", cfg_file, "--cron", "0 3 * * 0"]) == 2
    assert "cannot reach the Prefect API at PREFECT_API_URL=http://127.0.0.1:9/api" in capsys.readouterr().err


def _wait_for_deployment(client, name: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"finescope serve exited early:\n{log.read_text()}"
        try:
            client.read_deployment_by_name(name)
            return
        except ObjectNotFound:
            time.sleep(0.5)
    pytest.fail(f"deployment {name} not registered after {timeout} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the runner shuts down gracefully), then kill the whole process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the serve process leads its own group (start_new_session)
    proc.wait(timeout=20)


def test_served_deployment_runs_when_triggered(ws, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    api = get_current_settings().api.url  # the harness's temporary server (tests/flows/conftest.py)
    assert api
    name = f"t-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    cfg_file = write_config(tmp_path / "c.yaml", config(ws, store))
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    # A cron that does not come due during the test: the only run is the one triggered below.
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "serve",
        "--config",
        cfg_file,
        "--flow",
        "curate",
        "--cron",
        "0 0 1 1 *",
        "--name",
        name,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        with get_client(sync_client=True) as client:
            _wait_for_deployment(client, f"curate/{name}", proc, log, timeout=90)
        run = run_deployment(name=f"curate/{name}", timeout=180, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), f"{run.state}\n{log.read_text()}"
        assert run.parameters["config"]["store"] == str(store)
        assert len(list(store.glob("curated/*/curated.jsonl"))) == 1
        assert len(list(store.glob("sae/*/layer_*/sae.safetensors"))) == 3
    finally:
        _stop(proc)
    [line] = [x for x in log.read_text().splitlines() if x.startswith("serving deployment")]
    assert f"serving deployment 'curate/{name}' (cron '0 0 1 1 *' UTC)" in line
    assert f"UI: {api.removesuffix('/api')}/deployments" in line

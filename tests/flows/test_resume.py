"""`finescope run` killed with SIGKILL during teacher generation resumes where it stopped.

The run happens in a subprocess (`python -m flows.cli`) that talks to this session's temporary
Prefect API; the test kills it once the teacher's partial `distilled.jsonl` has some lines, re-runs
it, and compares everything with an uninterrupted run on a separate store.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_run import config_file, write_workspace

ROOT = Path(__file__).resolve().parents[2]
BEFORE_TEACHER = (
    "corpus",
    "seeds",
    "saliency",
    "activations",
    "seed_activations",
    "sae",
    "curated",
    "pruned",
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("resume"), questions=40)


def _config_file(root: Path, store: Path, path: Path) -> Path:
    curate = {
        "final_size": 36,
        "top_m": 36,
        "k_act": 16,
        "reference_size": 8,
        "max_length": 32,
        "sae": {"d_sae": 32, "steps": 20, "batch_size": 16},
    }
    # Many small batches with long answers: the teacher stage takes seconds, long enough to be killed in.
    teacher = {"max_new_tokens": 96, "batch_size": 2, "min_response_chars": 0}
    return config_file(root, store, path, curate=curate, teacher=teacher)


def _env() -> dict[str, str]:
    """This session's Prefect API for the child (no second temporary server to start), one thread."""
    from prefect.settings import get_current_settings

    return {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "OMP_NUM_THREADS": "1"}


def _start(cfg: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg), "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_during_teacher(proc: subprocess.Popen, store: Path, timeout: float = 240) -> int:
    """SIGKILL `proc` once the teacher has written at least two batches; the complete lines left behind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partial = sorted((store / ".partial" / "distilled").glob("*/distilled.jsonl"))
        if partial and _complete_lines(partial[0]) >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return _complete_lines(partial[0])
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (rc {proc.returncode}) before it could be killed:\n"
                f"{proc.stdout.read().decode()[-3000:]}"
            )
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the teacher stage never started")


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output.decode()[-4000:]


def _artifact(store: Path, stage: dict, name: str) -> bytes:
    return (store / stage["stage"] / stage["key"] / name).read_bytes()


def test_run_killed_during_teacher_resumes_and_matches_an_uninterrupted_run(workspace, tmp_path):
    store = tmp_path / "store"
    cfg = _config_file(workspace, store, tmp_path / "cfg.yaml")
    start = time.perf_counter()
    proc = _start(cfg, tmp_path / "out")
    lines_at_kill = _kill_during_teacher(proc, store)
    killed_after = time.perf_counter() - start
    assert proc.returncode == -signal.SIGKILL
    assert not (store / "distilled").exists()  # nothing committed for the killed stage

    start = time.perf_counter()
    _finish(_start(cfg, tmp_path / "out"))
    resume_seconds = time.perf_counter() - start
    resumed = json.loads((tmp_path / "out" / "run.json").read_text())["stages"]

    fresh_store = tmp_path / "fresh-store"
    start = time.perf_counter()
    _finish(_start(_config_file(workspace, fresh_store, tmp_path / "fresh.yaml"), tmp_path / "fresh-out"))
    fresh_seconds = time.perf_counter() - start
    fresh = json.loads((tmp_path / "fresh-out" / "run.json").read_text())["stages"]

    # (a) stages finished before the kill were reused, not recomputed
    assert {name: resumed[name]["cached"] for name in BEFORE_TEACHER} == dict.fromkeys(BEFORE_TEACHER, True)
    # (b) the teacher continued the killed run's file instead of starting over
    teacher = resumed["distilled"]
    assert teacher["cached"] is False and not (store / ".partial" / "distilled" / teacher["key"]).exists()
    total = teacher["info"]["total"]
    assert 0 < lines_at_kill < total
    assert teacher["info"]["resumed_from"] == lines_at_kill
    assert teacher["info"]["generated"] == total - lines_at_kill
    assert fresh["distilled"]["info"]["resumed_from"] == 0 and fresh["distilled"]["info"]["total"] == total
    # (c) the outputs equal those of an uninterrupted run
    assert _artifact(store, resumed["distilled"], "distilled.jsonl") == _artifact(
        fresh_store, fresh["distilled"], "distilled.jsonl"
    )
    assert _artifact(store, resumed["curated"], "curated.jsonl") == _artifact(
        fresh_store, fresh["curated"], "curated.jsonl"
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["models"]
    assert metrics == json.loads((tmp_path / "fresh-out" / "metrics.json").read_text())["models"]

    print(
        f"\nresume after SIGKILL: killed {killed_after:.1f}s into the run "
        f"with {lines_at_kill}/{total} teacher lines "
        f"written; resumed run {resume_seconds:.1f}s (generated {teacher['info']['generated']}), "
        f"uninterrupted run {fresh_seconds:.1f}s; teacher stage {teacher['seconds']:.1f}s resumed vs "
        f"{fresh['distilled']['seconds']:.1f}s fresh"
    )


def test_curate_killed_during_sae_training_keeps_the_finished_layers(workspace, tmp_path):
    """SIGKILL between the per-layer SAE tasks: the re-run trains only the missing layer."""

    def config(store: Path, path: Path) -> Path:
        cfg = yaml.safe_load(_config_file(workspace, store, path).read_text())
        # One layer at a time, each long enough (seconds) to be killed in between.
        cfg["curate"]["sae"] = {"d_sae": 32, "steps": 6000, "batch_size": 16}
        cfg["orchestration"] = {"workers": 1, "sae_layers_per_task": 1}
        path.write_text(yaml.safe_dump(cfg))
        return path

    def curate(cfg: Path, out: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "flows.cli", "curate", "--config", str(cfg), "--out", str(out)]
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    store = tmp_path / "store"
    cfg = config(store, tmp_path / "cfg.yaml")
    proc = curate(cfg, tmp_path / "out")
    deadline = time.monotonic() + 240
    while not list((store / "sae-layers").glob("*/_COMPLETE.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no SAE layer finished before the run ended:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in (store / "sae-layers").glob("*/_COMPLETE.json")}
    assert len(done) == 1 and not (store / "sae").exists()  # one of the 2 layers finished, nothing gathered

    start = time.perf_counter()
    _finish(curate(cfg, tmp_path / "out"))
    resume_seconds = time.perf_counter() - start
    stages = json.loads((tmp_path / "out" / "run.json").read_text())["stages"]
    after = {p.parent.name: p.stat().st_mtime_ns for p in (store / "sae-layers").glob("*/_COMPLETE.json")}
    assert len(after) == 2 and all(after[k] == v for k, v in done.items())  # the finished layer was reused
    assert stages["activations"]["cached"] and stages["saliency"]["cached"] and not stages["sae"]["cached"]

    fresh_store = tmp_path / "fresh-store"
    start = time.perf_counter()
    _finish(curate(config(fresh_store, tmp_path / "fresh.yaml"), tmp_path / "fresh-out"))
    fresh_seconds = time.perf_counter() - start
    assert (tmp_path / "out" / "curated.jsonl").read_bytes() == (
        tmp_path / "fresh-out" / "curated.jsonl"
    ).read_bytes()
    fresh = json.loads((tmp_path / "fresh-out" / "run.json").read_text())["stages"]
    for name in ("sae_00", "sae_01"):
        layer = name[-2:]
        assert _artifact(store, stages["sae"], f"layer_{layer}/sae.safetensors") == _artifact(
            fresh_store, fresh["sae"], f"layer_{layer}/sae.safetensors"
        )
    print(
        f"\nresume after SIGKILL in SAE training: resumed curate {resume_seconds:.1f}s, "
        f"fresh curate {fresh_seconds:.1f}s"
    )

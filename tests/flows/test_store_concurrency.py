"""Two runs of one config on one store at once: both succeed, and what they export is identical.

A stage's work dir is exclusive per key, so the second run of a stage waits for the first and then
reuses its artifact (before, the teacher's work dir was shared: both runs appended to one
`distilled.jsonl`, and the first's commit deleted it under the second).
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_run import config_file, write_workspace

from finescope_core.store import ArtifactStore
from tasks.caching import run_cached
from tasks.keymodels import StageKey

ROOT = Path(__file__).resolve().parents[2]


def test_two_runs_of_a_resumable_stage_never_share_its_work_dir(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    spec = StageKey("distilled", "1", {}, {"x": "1"})
    builds = []

    def build(work: Path) -> dict:
        builds.append(threading.get_ident())
        path = work / "distilled.jsonl"
        done = path.read_text().count("\n") if path.exists() else 0  # resume from the lines written
        for i in range(done, 6):
            with open(path, "a") as f:
                f.write(json.dumps({"line": i}) + "\n")
            time.sleep(0.05)
        return {"lines": 6}

    results, errors = [], []

    def run() -> None:
        try:
            results.append(run_cached(store, spec, build, resume=True))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.08)  # the second starts while the first is writing
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 2
    assert len(builds) == 1 and sorted(m.cached for m in results) == [False, True]
    assert results[0].sha256 == results[1].sha256
    found = store.lookup(spec.stage, spec.key)
    lines = (store.local_path(found) / "distilled.jsonl").read_text().splitlines()
    assert [json.loads(line)["line"] for line in lines] == list(range(6))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    return write_workspace(root)


def concurrent_config(root: Path, store: str, path: Path, storage: dict | None = None) -> Path:
    # Small batches: the teacher stage lasts long enough for the two runs to meet in it.
    teacher = {"max_new_tokens": 16, "batch_size": 2, "min_response_chars": 0}
    return config_file(root, store, path, storage=storage or {}, teacher=teacher)


def _env(tmp: Path) -> dict[str, str]:
    """This session's Prefect API; one temp dir for both runs (a remote store's work dirs live there)."""
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp),
    }


def run_twice_at_once(cfg: Path, tmp: Path) -> list[Path]:
    """Start two runs of `cfg` at once; their outputs. Each logs to a file (a full pipe would block a run
    while it holds a stage's lock, and the other run waits on that lock)."""
    outs = [tmp / "out-a", tmp / "out-b"]
    (tmp / "tmp").mkdir()
    logs = [tmp / "run-a.log", tmp / "run-b.log"]
    procs = []
    for out, log in zip(outs, logs, strict=True):
        with open(log, "wb") as sink:
            cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg), "--out", str(out)]
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp / "tmp"), stdout=sink, stderr=subprocess.STDOUT)
            )
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=900)
        assert p.returncode == 0, log.read_text()[-4000:]
    text = "".join(log.read_text() for log in logs)
    waits = sorted(set(re.findall(r"(\S+) [0-9a-f]{20}: another run is building it", text)))
    print(f"\ntwo runs at once: one waited for the other at {waits or 'no stage'}")
    return outs


def exported(out: Path) -> dict[str, str]:
    """sha256 of the exported models' weights and configs and of the distilled data."""
    files = [
        p
        for d in ("pruned-model", "tuned-model")
        for p in sorted((out / d).rglob("*"))
        if p.suffix in (".safetensors", ".json")
    ]
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [*files, out / "distilled" / "distilled.jsonl"]
    }


def keys(out: Path) -> dict[str, str]:
    """Each stage's key (the sparse codes: their parts'); the report's hashes the stage timings, left out."""
    stages = json.loads((out / "run.json").read_text())["stages"]
    return {name: s.get("key", s.get("parts")) for name, s in stages.items() if name != "report"}


def test_two_runs_at_once_on_a_local_store(workspace, tmp_path):
    cfg = concurrent_config(workspace, str(tmp_path / "store"), tmp_path / "cfg.yaml")
    a, b = run_twice_at_once(cfg, tmp_path)
    assert keys(a) == keys(b) and exported(a) == exported(b)
    assert len(json.loads((a / "distilled" / "distilled.jsonl").read_text().splitlines()[0])) > 0


def test_two_runs_at_once_on_s3(workspace, tmp_path, s3_server, s3_prefix):
    cfg = concurrent_config(workspace, f"{s3_prefix}/store", tmp_path / "cfg.yaml", s3_server.storage())
    a, b = run_twice_at_once(cfg, tmp_path)
    assert keys(a) == keys(b) and exported(a) == exported(b)

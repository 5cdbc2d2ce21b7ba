import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from finescope_core.store import (
    MARKER,
    ArtifactStore,
    RetryPolicy,
    StoreError,
    cache_key,
    is_transient,
    lock_path,
    work_lock,
)
from finescope_core.store_admin import RESULTS_DIR, collect, find_garbage, in_use, remove_work_dir, scan


def test_commit_then_lookup_and_deleted_artifact_is_a_miss(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    key = cache_key("stage", "1", {"a": 1}, {"x": "h"})
    assert store.lookup("stage", key) is None
    with store.work_dir("stage", key, resume=False) as work:
        (work / "sub").mkdir()
        (work / "sub" / "f.txt").write_text("hi")
        art = store.commit(work, "stage", key, {"info": {"n": 1}})
    found = store.lookup("stage", key)
    assert found is not None and found.manifest["info"] == {"n": 1}
    assert set(found.manifest["files"]) == {"sub/f.txt"} and found.sha256 == art.sha256
    assert (store.local_path(found) / "sub" / "f.txt").read_text() == "hi"
    (store.local_path(found) / MARKER).unlink()
    assert store.lookup("stage", key) is None


def test_unfinished_directory_is_never_seen_and_is_superseded(tmp_path):
    store = ArtifactStore(str(tmp_path))
    half = tmp_path / "stage" / "k"
    half.mkdir(parents=True)
    (half / "partial.bin").write_text("junk")
    assert store.lookup("stage", "k") is None
    with store.work_dir("stage", "k", resume=False) as work:
        (work / "good.txt").write_text("ok")
        store.commit(work, "stage", "k", {})
    # The commit cannot tell junk from a concurrent commit's files, so it goes beside them, never over them.
    found = store.lookup("stage", "k")
    assert found is not None and found.version and found.manifest["files"].keys() == {"good.txt"}
    assert sorted(p.name for p in store.local_path(found).iterdir()) == ["good.txt"]
    listing = scan(store)
    assert [(x.kind, x.path) for x in listing.leftovers] == [("old version", str(half / "partial.bin"))]
    assert listing.artifacts[0].files == 2  # the marker and good.txt; the junk is not part of the artifact
    collect(store, find_garbage(store, listing, min_age_minutes=0).delete, min_age_minutes=0)
    assert sorted(p.name for p in half.iterdir()) == sorted([found.version, MARKER])
    assert (store.local_path(store.lookup("stage", "k")) / "good.txt").read_text() == "ok"


def test_cache_key_depends_on_everything():
    base = cache_key("s", "1", {"a": 1}, {"x": "h"})
    assert base == cache_key("s", "1", {"a": 1}, {"x": "h"})
    assert (
        len(
            {
                base,
                cache_key("s", "2", {"a": 1}, {"x": "h"}),
                cache_key("s", "1", {"a": 2}, {"x": "h"}),
                cache_key("s", "1", {"a": 1}, {"x": "g"}),
                cache_key("t", "1", {"a": 1}, {"x": "h"}),
            }
        )
        == 5
    )


def test_unwritable_store_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError, match="is not writable"):
        ArtifactStore(str(blocker / "store")).check_writable()


def test_work_dir_survives_a_crash_for_resume_and_is_cleared_otherwise(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(RuntimeError), store.work_dir("teacher", "k", resume=True) as work:
        (work / "partial.jsonl").write_text("line 1\n")
        raise RuntimeError("killed")
    with store.work_dir("teacher", "k", resume=True) as work:
        assert (work / "partial.jsonl").read_text() == "line 1\n"
        raise_later = work
    assert not raise_later.exists()  # removed after a clean exit
    with pytest.raises(RuntimeError), store.work_dir("sae", "k", resume=False) as work:
        (work / "half.bin").write_text("x")
        raise RuntimeError("killed")
    with store.work_dir("sae", "k", resume=False) as work:
        assert list(work.iterdir()) == []


class Flaky:
    """Fails with `error` for the first `failures` calls, then returns "ok"."""

    def __init__(self, error: BaseException, failures: int):
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


FAST = RetryPolicy(attempts=4, first_delay=0.001, max_delay=0.002)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),
        TimeoutError("slow"),
        OSError(errno.EBUSY, "SlowDown"),
        OSError(errno.EREMOTEIO, "InternalError"),
    ],
)
def test_transient_errors_are_retried_until_they_pass(error):
    flaky = Flaky(error, failures=3)
    assert FAST.call("op", flaky) == "ok" and flaky.calls == 4


@pytest.mark.parametrize(
    "error",
    [
        PermissionError("Forbidden"),
        FileNotFoundError("gone"),
        ValueError("bad"),
        OSError(errno.EIO, "unknown"),
    ],
)
def test_permanent_errors_are_raised_at_once(error):
    flaky = Flaky(error, failures=1)
    with pytest.raises(type(error)):
        FAST.call("op", flaky)
    assert flaky.calls == 1


def test_retries_are_bounded():
    flaky = Flaky(ConnectionResetError(104, "reset"), failures=10)
    with pytest.raises(ConnectionResetError):
        FAST.call("op", flaky)
    assert flaky.calls == 4


def test_boto_errors_are_classified():
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    server_error = {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}
    denied = {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}
    assert is_transient(ClientError(server_error, "PutObject"))
    assert not is_transient(ClientError(denied, "PutObject"))
    wrapped = OSError(errno.EIO, "unrecognised")
    wrapped.__cause__ = ClientError(server_error, "GetObject")
    assert is_transient(wrapped)


def test_the_store_packages_declare_every_name_the_other_layers_import():
    """`store` and `store_admin` are packages whose `__init__` re-exports their modules' names: each
    name in `__all__` resolves, and every name that tasks, flows, tests or bench import is in it."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in ("finescope_core.store", "finescope_core.store_admin"):
        package = importlib.import_module(name)
        assert [n for n in package.__all__ if getattr(package, n, None) is None] == []
        imported = {
            alias.name
            for layer in ("tasks", "flows", "tests", "bench")
            for path in (root / layer).rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == name
            for alias in node.names
        }
        assert imported and imported <= set(package.__all__), imported - set(package.__all__)


# --- listing and cleaning up (finescope_core.store_admin) -------------------------------------------

DAY = 86400


def commit(store: ArtifactStore, stage: str, key: str, payload: bytes, info: dict | None = None) -> None:
    with store.work_dir(stage, key, resume=False) as work:
        (work / "data.bin").write_bytes(payload)
        store.commit(
            work,
            stage,
            key,
            {"version": "1", "config": {"seed": 0}, "inputs": {"x": "h"}, "info": info or {}},
        )


def killed_work_dir(store: ArtifactStore, stage: str, key: str, payload: bytes) -> Path:
    """A work dir as a run killed mid-stage leaves it: files, and no lock held."""
    with pytest.raises(RuntimeError), store.work_dir(stage, key, resume=True) as work:
        (work / "partial.jsonl").write_bytes(payload)
        raise RuntimeError("killed")
    return work


def test_scan_lists_artifacts_with_sizes_and_every_kind_of_leftover(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    commit(store, "corpus", "c1", b"x" * 1000, {"records": 80, "dropped_duplicates": 1})
    commit(store, "sae", "s1", b"y" * 3000, {"layers": [0, 1], "metrics": [{"fvu": 0.1}, {"fvu": 0.2}]})
    work = killed_work_dir(store, "distilled", "d1", b"z" * 500)
    half = tmp_path / "store" / "pruned" / "p1"  # an object-store commit killed before its marker
    half.mkdir(parents=True)
    (half / "model.bin").write_bytes(b"w" * 200)
    copy = tmp_path / "store" / "pruned" / ".p2.tmp-1234"  # a local commit's copy, marker included
    copy.mkdir()
    (copy / MARKER).write_text("{}")
    (tmp_path / "store" / RESULTS_DIR).mkdir()
    (tmp_path / "store" / RESULTS_DIR / "r1").write_bytes(b"r" * 70)

    listing = scan(store)
    arts = {(a.stage, a.key): a for a in listing.artifacts}
    assert set(arts) == {("corpus", "c1"), ("sae", "s1")}
    marker_size = (tmp_path / "store" / "corpus" / "c1" / MARKER).stat().st_size
    assert arts["corpus", "c1"].size == 1000 + marker_size and arts["corpus", "c1"].files == 2
    assert arts["corpus", "c1"].description == "records=80 dropped_duplicates=1 seed=0"
    assert arts["sae", "s1"].description.startswith(
        "layers=[0,1]"
    )  # the per-layer metrics are too big to show
    assert abs(arts["corpus", "c1"].created - time.time()) < 60
    left = {(x.kind, x.stage, x.key): x for x in listing.leftovers}
    assert set(left) == {
        ("work dir", "distilled", "d1"),
        ("unfinished commit", "pruned", "p1"),
        ("unfinished commit", "pruned", ".p2.tmp-1234"),
    }
    assert left["work dir", "distilled", "d1"].size == 500 and left[
        "work dir", "distilled", "d1"
    ].path == str(work)
    assert not left["work dir", "distilled", "d1"].in_use
    assert [f.size for f in listing.results] == [70]
    doc = listing.to_json()
    assert doc["stages"]["corpus"]["count"] == 1 and doc["total"]["count"] == 2
    assert doc["leftovers_size"] == 500 + 200 + 2
    json.dumps(doc)


def test_delete_drops_the_marker_first_so_an_interrupted_delete_is_a_miss(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    commit(store, "sae", "k", b"weights")

    def cut_short(*args, **kwargs):
        raise OSError("killed mid-delete")

    monkeypatch.setattr(store, "remove_tree", cut_short)
    with pytest.raises(OSError, match="killed mid-delete"):
        store.delete("sae", "k")
    assert store.lookup("sae", "k") is None and (tmp_path / "sae" / "k" / "data.bin").exists()
    monkeypatch.undo()
    listing = scan(store)
    assert [(x.kind, x.key) for x in listing.leftovers] == [
        ("unfinished commit", "k")
    ]  # gc collects the rest
    store.delete("sae", "k")
    assert not (tmp_path / "sae" / "k").exists()
    store.delete("sae", "k")  # already gone: nothing to do


def test_a_work_dir_in_use_is_never_collected(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with store.work_dir("distilled", "live", resume=True) as work:
        (work / "partial.jsonl").write_text("line\n")
        os.utime(work / "partial.jsonl", (time.time() - 3 * 3600,) * 2)  # quiet for hours, still running
        listing = scan(store)
        assert [x.in_use for x in listing.leftovers] == [True]
        plan = find_garbage(store, listing, min_age_minutes=0)
        assert plan.delete == [] and "in use" in plan.kept[0].reason
        assert not remove_work_dir(work)
        assert (work / "partial.jsonl").exists()
    killed = killed_work_dir(store, "distilled", "dead", b"abc")
    plan = find_garbage(store, scan(store), min_age_minutes=60)
    assert plan.delete == [] and "min ago" in plan.kept[0].reason  # too fresh: might be a run starting up
    plan = find_garbage(store, scan(store), min_age_minutes=0)
    assert [(x.kind, x.key) for x in plan.delete] == [("work dir", "dead")]
    assert collect(store, plan.delete, min_age_minutes=0) == 3
    assert not killed.exists() and not lock_path(killed).exists() and not lock_path(work).exists()


def test_a_stage_waiting_on_a_collector_never_works_in_a_deleted_dir(tmp_path):
    """The collector unlinks the lock file; a stage that opened the old one re-locks a fresh file."""
    store = ArtifactStore(str(tmp_path))
    work = killed_work_dir(store, "sae", "k", b"x")
    with work_lock(work, exclusive=True) as mine:
        assert mine
        with work_lock(work, blocking=False) as other:
            assert not other  # a stage starting now would wait for us
        shutil.rmtree(work)
        lock_path(work).unlink()
    with store.work_dir("sae", "k", resume=True) as again:
        assert again.is_dir() and not in_use(tmp_path / ".partial" / "sae" / "other")


def test_garbage_rules_for_configs_and_age(tmp_path):
    store = ArtifactStore(str(tmp_path))
    for key in ("used-old", "unused-old", "unused-new"):
        commit(store, "curated", key, key.encode())
    listing = scan(store)
    now = time.time() + 10 * DAY  # every artifact is ten days old by then...
    fresh = [a for a in listing.artifacts if a.key == "unused-new"][0]
    fresh.record["created"] = now - DAY  # ...except this one
    keep = {("curated", "used-old")}

    def doomed(**kw):
        return sorted(x.key for x in find_garbage(store, listing, now=now, **kw).delete)

    assert doomed() == []  # neither configs nor an age: only leftovers are garbage
    assert doomed(keep=keep) == ["unused-new", "unused-old"]
    assert doomed(keep_days=5) == ["unused-old", "used-old"]
    assert doomed(keep=keep, keep_days=5) == ["unused-old"]  # unused *and* old
    plan = find_garbage(store, listing, now=now, keep=keep, keep_days=5)
    assert plan.delete[0].reason == "used by none of the given configs and created 10.0 days ago"
    assert collect(store, plan.delete) == plan.size > 0
    assert store.lookup("curated", "unused-old") is None and store.lookup("curated", "used-old") is not None


def test_exported_outputs_in_the_store_are_listed_and_never_collected(tmp_path):
    store = ArtifactStore(str(tmp_path))
    (tmp_path / "outputs" / "math" / "tuned-model").mkdir(parents=True)
    (tmp_path / "outputs" / "math" / "tuned-model" / "model.safetensors").write_bytes(b"w" * 64)
    old = time.time() - 30 * DAY
    os.utime(tmp_path / "outputs" / "math" / "tuned-model" / "model.safetensors", (old, old))
    listing = scan(store)
    assert [f.size for f in listing.outputs] == [64] and listing.leftovers == [] and listing.artifacts == []
    assert find_garbage(store, listing, keep=set(), keep_days=1, min_age_minutes=0).delete == []


def test_a_planned_stages_work_dir_is_kept_for_resuming(tmp_path):
    store = ArtifactStore(str(tmp_path))
    killed_work_dir(store, "distilled", "planned", b"x")
    killed_work_dir(store, "distilled", "stray", b"y")
    plan = find_garbage(store, scan(store), keep={("distilled", "planned")}, min_age_minutes=0)
    assert [x.key for x in plan.delete] == ["stray"] and "resumes" in plan.kept[0].reason


def test_ls_and_rm_on_s3(s3_server, s3_prefix, tmp_path, monkeypatch):
    from s3server import ACCESS_KEY, SECRET_KEY

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # work dirs of a remote store: this test's own
    options = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": s3_server.endpoint},
        "skip_instance_cache": True,
    }
    store = ArtifactStore(s3_prefix, options, cache_dir=tmp_path / "cache")
    commit(store, "sae", "k1", b"a" * 100, {"layers": [0]})
    commit(store, "sae", "k2", b"b" * 50)
    store.fs.pipe_file(f"{store.root}/pruned/half/model.bin", b"c" * 10)
    killed_work_dir(store, "distilled", "d", b"d" * 7)
    store.local_path(store.lookup("sae", "k1"))  # a verified copy on this machine
    listing = scan(store)
    assert sorted((a.key, a.size - len(json.dumps(a.record, indent=2))) for a in listing.artifacts) == [
        ("k1", 100),
        ("k2", 50),
    ]
    assert sorted((x.kind, x.size) for x in listing.leftovers) == [("unfinished commit", 10), ("work dir", 7)]
    assert listing.artifacts[0].uri == f"{s3_prefix}/sae/k1"

    store.delete("sae", "k1")
    files = store.fs.find(f"{store.root}/sae/k1", detail=True).values()
    assert store.lookup("sae", "k1") is None and [f for f in files if f["type"] == "file"] == []
    assert not (tmp_path / "cache" / "sae" / "k1").exists()
    plan = find_garbage(store, scan(store), min_age_minutes=0)
    assert sorted(x.kind for x in plan.delete) == ["unfinished commit", "work dir"]
    assert collect(store, plan.delete, min_age_minutes=0) == 17
    assert [a.key for a in scan(store).artifacts] == ["k2"] and scan(store).leftovers == []

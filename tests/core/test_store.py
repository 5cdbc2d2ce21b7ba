import json

import pytest

from finescope_core.store import MARKER, ArtifactStore, StoreError, cache_key


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


def test_unfinished_directory_is_never_seen_and_is_replaced(tmp_path):
    store = ArtifactStore(str(tmp_path))
    half = tmp_path / "stage" / "k"
    half.mkdir(parents=True)
    (half / "partial.bin").write_text("junk")
    assert store.lookup("stage", "k") is None
    with store.work_dir("stage", "k", resume=False) as work:
        (work / "good.txt").write_text("ok")
        store.commit(work, "stage", "k", {})
    assert sorted(p.name for p in half.iterdir()) == sorted(["good.txt", MARKER])
    assert json.loads((half / MARKER).read_text())["files"].keys() == {"good.txt"}


def test_cache_key_depends_on_everything():
    base = cache_key("s", "1", {"a": 1}, {"x": "h"})
    assert base == cache_key("s", "1", {"a": 1}, {"x": "h"})
    assert len({base, cache_key("s", "2", {"a": 1}, {"x": "h"}), cache_key("s", "1", {"a": 2}, {"x": "h"}),
                cache_key("s", "1", {"a": 1}, {"x": "g"}), cache_key("t", "1", {"a": 1}, {"x": "h"})}) == 5


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

"""Store commits next to readers, and reuse of damaged artifacts.

A commit must never leave a moment in which a committed key has no complete artifact, nor take files
from under a reader that holds an earlier version; a reader whose version was collected meanwhile
moves to the new one. Every check is made after each filesystem mutation of the commit, so a window
of any length is caught, not only one a poll happens to hit.
"""

import errno
import os
import shutil
import tempfile

import pytest

from finescope_core.store import MARKER, ArtifactStore, DamagedArtifact, StoreError
from finescope_core.store_admin import collect, find_garbage, scan

WEIGHTS = bytes(range(256)) * 64


def commit(store: ArtifactStore, key: str, weights: bytes = WEIGHTS):
    with store.work_dir("stage", key, resume=False) as work:
        (work / "sub").mkdir()
        (work / "sub" / "weights.bin").write_bytes(weights)
        (work / "meta.json").write_text('{"n": 3}')
        return store.commit(work, "stage", key, {"info": {"n": 3}})


def test_reuse_check_finds_truncated_missing_and_replaced_files(tmp_path):
    store = ArtifactStore(str(tmp_path))
    art = commit(store, "k")
    assert set(art.manifest["sizes"]) == set(art.manifest["mtimes"]) == {"sub/weights.bin", "meta.json"}
    assert store.verify(art) == [] and store.verify(art, full=True) == []
    weights = store.local_path(art) / "sub" / "weights.bin"

    os.utime(weights)  # touched, not changed: the mtime moved, so the file is hashed, and it matches
    assert store.verify(art) == []
    with open(weights, "r+b") as f:
        f.truncate(1000)
    assert store.verify(art) == [f"sub/weights.bin: 1000 bytes, {len(WEIGHTS)} recorded"]
    with pytest.raises(DamagedArtifact, match=r"stage artifact k .* is damaged: sub/weights.bin: 1000 bytes"):
        store.local_path(art)
    weights.write_bytes(WEIGHTS[::-1])  # same size, new content, new mtime
    assert store.verify(art) == ["sub/weights.bin: content does not match its recorded sha256"]
    weights.unlink()
    assert store.verify(art) == ["sub/weights.bin: missing"]


def test_artifact_hashes_do_not_depend_on_when_files_were_written(tmp_path):
    first = commit(ArtifactStore(str(tmp_path / "a")), "k")
    second = commit(ArtifactStore(str(tmp_path / "b")), "k")
    assert (
        first.manifest["mtimes"] != second.manifest["mtimes"]
        or first.manifest["created"] != second.manifest["created"]
    )
    assert first.sha256 == second.sha256


def whole(store: ArtifactStore, art) -> bool:
    """Every file the artifact's marker lists is in the store (where the marker says: its version, if any)."""
    base = f"{store.root}/{art.stage}/{art.key}" + (
        f"/{art.manifest['dir']}" if art.manifest.get("dir") else ""
    )
    return all(store.fs.exists(f"{base}/{rel}") for rel in art.manifest["files"])


class Watch:
    """After every filesystem mutation, check that a lookup finds a complete artifact and that the
    reader's version is still whole."""

    def __init__(self, store: ArtifactStore, reader):
        self.store, self.reader, self.checks = store, reader, 0

    def check(self, what: str) -> None:
        self.checks += 1
        current = self.store.lookup(self.reader.stage, self.reader.key)
        assert current is not None, f"after {what}: no committed artifact"
        assert whole(self.store, current), f"after {what}: the committed artifact is incomplete"
        assert whole(self.store, self.reader), f"after {what}: the reader's version lost files"

    def wrap(self, owner, name: str, monkeypatch) -> None:
        real = getattr(owner, name)

        def watched(*args, **kwargs):
            out = real(*args, **kwargs)
            self.check(name)
            return out

        monkeypatch.setattr(owner, name, watched)


def test_a_local_commit_over_a_committed_key_keeps_the_readers_version(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    reader = commit(store, "k")
    held = store.local_path(reader)
    watch = Watch(store, reader)
    for name in ("replace", "rename", "unlink", "rmdir"):
        watch.wrap(os, name, monkeypatch)
    watch.wrap(shutil, "rmtree", monkeypatch)
    again = commit(store, "k")  # a concurrent run, or a recompute
    monkeypatch.undo()
    assert watch.checks >= 2
    assert again.version and again.sha256 == reader.sha256
    assert (held / "sub" / "weights.bin").read_bytes() == WEIGHTS  # the reader's files are where they were
    assert store.lookup("stage", "k").manifest == again.manifest

    # gc collects the superseded files once they are old enough (a reader may still be on them)
    listing = scan(store)
    old = [x for x in listing.leftovers if x.kind == "old version"]
    assert sorted(x.path.rsplit("/", 1)[-1] for x in old) == ["meta.json", "sub"]
    assert find_garbage(store, listing).delete == []  # recent: kept
    collect(store, find_garbage(store, listing, min_age_minutes=0).delete, min_age_minutes=0)
    assert sorted(p.name for p in (tmp_path / "stage" / "k").iterdir()) == sorted([MARKER, again.version])
    # a reader still on the collected version moves to the new one, which holds the same content
    moved = store.local_path(reader)
    assert (
        moved == tmp_path / "stage" / "k" / again.version
        and (moved / "sub" / "weights.bin").read_bytes() == WEIGHTS
    )


def test_a_reader_is_never_moved_to_different_content(tmp_path):
    store = ArtifactStore(str(tmp_path))
    reader = commit(store, "k")
    commit(store, "k", WEIGHTS[::-1])
    shutil.rmtree(tmp_path / "stage" / "k" / "sub")
    with pytest.raises(DamagedArtifact, match="replaced by different content"):
        store.local_path(reader)


def test_a_remote_commit_over_a_committed_key_keeps_the_readers_version(
    s3_server, s3_prefix, tmp_path, monkeypatch
):
    from s3server import ACCESS_KEY, SECRET_KEY

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # work dirs of a remote store: this test's own
    options = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": s3_server.endpoint},
        "skip_instance_cache": True,
    }
    store = ArtifactStore(s3_prefix, options, cache_dir=tmp_path / "cache")
    reader = commit(store, "k")
    assert store.local_path(reader).is_dir()
    watch = Watch(store, reader)
    for name in ("rm", "rm_file", "put_file", "pipe_file"):
        watch.wrap(store.fs, name, monkeypatch)
    again = commit(store, "k")
    monkeypatch.undo()
    assert watch.checks >= 3 and again.version != reader.version and again.sha256 == reader.sha256

    listing = scan(store)
    assert [(x.kind, x.path) for x in listing.leftovers] == [
        ("old version", f"{store.root}/stage/k/{reader.version}")
    ]
    collect(store, find_garbage(store, listing, min_age_minutes=0).delete, min_age_minutes=0)
    assert store.fs.exists(f"{store.root}/stage/k/{again.version}/sub/weights.bin")
    left = store.fs.find(f"{store.root}/stage/k/{reader.version}", detail=True).values()
    assert [f for f in left if f["type"] == "file"] == []  # SeaweedFS may keep the empty directory
    # listed but missing: the reader's version is gone; it is read from the new one (and cached per version)
    moved = store.local_path(reader)
    assert moved.name == again.version and (moved / "sub" / "weights.bin").read_bytes() == WEIGHTS
    (moved / "sub" / "weights.bin").write_bytes(b"damaged copy")
    assert (
        store.local_path(again) / "sub" / "weights.bin"
    ).read_bytes() == WEIGHTS  # a bad copy is fetched again
    assert store.verify(again) == []
    store.fs.rm_file(f"{store.root}/stage/k/{again.version}/meta.json")
    assert store.verify(again) == ["meta.json: missing"]


def test_a_read_only_store_reuses_and_refuses_to_compute_before_the_work(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    commit(store, "k")

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store.fs, "pipe_file", refuse)
    assert store.check_writable() is False  # an existing store: reuse is possible
    shutil.rmtree(tmp_path / "store" / ".partial")
    (tmp_path / "store" / ".partial").write_text("")  # and nothing can be created in it
    refused = pytest.raises(StoreError, match=r"stage 'stage' \(key other\).*must be computed.*writable")
    with refused, store.work_dir("stage", "other", resume=False):
        pytest.fail("the stage's work started")
    with pytest.raises(StoreError, match="is not writable"):  # a store that does not exist is still refused
        ArtifactStore(str(tmp_path / "store" / "missing")).check_writable()

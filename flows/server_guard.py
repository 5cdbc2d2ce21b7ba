"""The temporary Prefect API of a run without `PREFECT_API_URL` ends with the process that started it.

Prefect starts it as a `uvicorn` child process and stops it from an `atexit` hook, which a SIGKILL (or
an out-of-memory kill) of the run skips: the server then lives on, holding its port and database. Here
the child itself watches its parent: it runs uvicorn in-process beside a thread that, once the parent
is gone (the child is re-parented), sends the child SIGTERM (uvicorn's graceful shutdown) and exits
hard 10 s later if that did not end it. A thread in the child (not PR_SET_PDEATHSIG, which fires when
the *thread* that spawned the child ends) works whichever of Prefect's threads started the server.

`install()` makes Prefect's `SubprocessASGIServer` start its process this way; the command line and
environment are otherwise Prefect's own (prefect 3.8).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

# Runs as `python -c _CHILD <parent pid> <uvicorn arguments...>`: no import of finescope in the child,
# so it starts wherever Prefect's server can start.
_CHILD = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])

def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)

threading.Thread(target=watch, daemon=True, name="parent-watch").start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _guarded_uvicorn_command(self: Any) -> subprocess.Popen[Any]:
    """`SubprocessASGIServer._run_uvicorn_command` with the parent watch: the same arguments and
    environment."""
    import prefect
    from prefect.settings import get_current_settings

    server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    uvicorn_args = [
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(self.port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    return subprocess.Popen(
        args=[sys.executable, "-c", _CHILD, str(os.getpid()), *uvicorn_args],
        env={
            **os.environ,
            **server_env,
            **get_current_settings().to_environment_variables(exclude_unset=True),
        },
    )


def install() -> None:
    """Make every temporary Prefect server this process starts from now on watch this process."""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer._run_uvicorn_command = _guarded_uvicorn_command  # type: ignore[method-assign]

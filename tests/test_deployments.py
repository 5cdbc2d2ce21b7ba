"""deployments/prefect.yaml: its parameters are valid configs, and a real Prefect server registers
it as written.

The server tests start a `prefect server start` of their own, create the README's work pools (with the
base job templates `prefect work-pool create --type` gives), run the README's `prefect deploy`, and
read back what was registered. Then they render the docker deployments' job variables as the docker
worker does, down to docker-py's container arguments: everything short of a Docker daemon.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from finescope_core.config import FinescopeConfig

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
SPEC = yaml.safe_load(PREFECT_FILE.read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
POOL_TYPES = {
    "finescope-cpu": "process",
    "finescope-gpu": "process",
    "finescope-docker-cpu": "docker",
    "finescope-docker-gpu": "docker",
}
# The README deploys one set per kind of pool (`--all` would schedule every flow twice): `*-docker`, or
# the process deployments by name. One call with both selections saves a CLI start.
SELECT = ["--name", "*-docker", "--name", "curate-nightly", "--name", "specialize-weekly"]
Registered = dict[str, tuple[Any, Any, str]]  # deployment name: (deployment, its work pool, its flow's name)


def test_deployment_parameters_validate():
    assert SPEC["deployments"], "no deployments defined"
    for dep in SPEC["deployments"]:
        module, func = dep["entrypoint"].split(":")
        assert f"def {func}(" in (ROOT / module).read_text()
        FinescopeConfig.model_validate(dep["parameters"]["config"])
        assert all("cron" in s for s in dep["schedules"])


def test_docker_images_pin_the_same_torch_as_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert "torch==2.13.0" in (ROOT / "docker" / name).read_text()


def test_image_tags_are_the_package_version_that_make_images_builds():
    images = SPEC["definitions"]["images"]
    assert images == {"cpu": f"finescope:{VERSION}-cpu", "cuda": f"finescope:{VERSION}-cuda"}
    dry = subprocess.run(
        ["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert f"-f docker/Dockerfile.cpu -t {images['cpu']} ." in dry
    assert f"-f docker/Dockerfile.cuda -t {images['cuda']} ." in dry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers: no server outlives the test."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A `prefect server start` with a fresh PREFECT_HOME; yields the environment of CLI calls to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = str(_free_port())
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": url,
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--no-ui",
                "--no-services",
                "--analytics-off",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prefect server exited:\n{log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"prefect server not healthy after 60 s:\n{log.read_text()}"
            time.sleep(0.25)
        yield env
    finally:
        _stop(proc)


async def _create_pools_and_read_deployments(api: str, deploy: list[str], env: dict[str, str]) -> Registered:
    """Creates the pools, runs `prefect deploy`, and returns each deployment by name with its pool and
    flow name.

    A pool gets the base job template that `prefect work-pool create --type KIND` would give it (the
    installed worker's, else the server's copy of the collection registry), without a CLI start per pool.
    """
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    async with PrefectClient(api) as client:
        for name, kind in POOL_TYPES.items():
            with temporary_settings({PREFECT_API_URL: api}):
                template = await get_default_base_job_template_for_infrastructure_type(kind)
            assert template, f"no base job template for work pools of type {kind!r}"
            await client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
        done = subprocess.run(deploy, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"prefect deploy:\n{done.stdout}\n{done.stderr}"
        found = {}
        for dep in await client.read_deployments():
            flow = await client.read_flow(dep.flow_id)
            found[dep.name] = (dep, await client.read_work_pool(dep.work_pool_name), flow.name)
        return found


@pytest.fixture(scope="module")
def registered(prefect_env) -> Registered:
    """Both deployment sets deployed with the README's command to pools of the README's names and types."""
    deploy = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(PREFECT_FILE),
        *SELECT,
    ]
    return asyncio.run(
        _create_pools_and_read_deployments(prefect_env["PREFECT_API_URL"], deploy, prefect_env)
    )


def test_every_deployment_is_registered_as_the_file_says(registered):
    assert set(registered) == {d["name"] for d in SPEC["deployments"]}
    for spec in SPEC["deployments"]:
        dep, pool, flow_name = registered[spec["name"]]
        assert flow_name == spec["entrypoint"].split(":")[1].removesuffix("_flow")
        assert (dep.entrypoint, dep.tags, dep.parameters) == (
            spec["entrypoint"],
            spec["tags"],
            spec["parameters"],
        )
        assert (pool.name, pool.type) == (spec["work_pool"]["name"], POOL_TYPES[pool.name])
        assert dep.job_variables == spec["work_pool"].get("job_variables", {})
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [
            (s["cron"], s["timezone"], True) for s in spec["schedules"]
        ]
        [(step, args)] = [next(iter(s.items())) for s in dep.pull_steps]
        assert step == "prefect.deployments.steps.set_working_directory"
        # docker: the image's WORKDIR (the code is in the image); process: the worker host's checkout
        assert args["directory"] == ("/opt/finescope" if pool.type == "docker" else "{{ $FINESCOPE_HOME }}")
    dockerfile = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "WORKDIR /opt/finescope" in dockerfile and "COPY flows flows" in dockerfile


def test_docker_job_variables_make_the_containers_the_worker_would_create(prefect_env, registered):
    """Rendered by prefect-docker's job configuration, then turned into docker-py's create arguments."""
    pytest.importorskip("prefect_docker", reason="install the dev extras (prefect-docker)")
    from docker.models.containers import _create_container_args
    from prefect.client.orchestration import PrefectClient
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    class Engine:  # the one call the worker makes to the Docker daemon before creating a container
        def version(self) -> dict[str, str]:
            return {"Version": "27.5.1"}

    async def render(entries: list[tuple[Any, Any, str]]) -> list[DockerWorkerJobConfiguration]:
        async with PrefectClient(prefect_env["PREFECT_API_URL"]) as client:
            return [
                await DockerWorkerJobConfiguration.from_template_and_values(
                    pool.base_job_template, dep.job_variables, client=client
                )
                for dep, pool, _ in entries
            ]

    images = SPEC["definitions"]["images"]
    docker = [entry for entry in registered.values() if entry[1].type == "docker"]
    assert sorted(pool.name for _, pool, _ in docker) == ["finescope-docker-cpu", "finescope-docker-gpu"]
    for (dep, pool, _), config in zip(docker, asyncio.run(render(docker)), strict=True):
        fields = pool.base_job_template["variables"]["properties"]
        assert set(dep.job_variables) <= set(fields), (
            "the docker worker ignores job variables it does not know"
        )
        settings = DockerWorker(work_pool_name=pool.name)._build_container_settings(Engine(), config)
        host = _create_container_args({**settings, "version": "1.47"})["host_config"]
        gpu = pool.name == "finescope-docker-gpu"
        assert settings["image"] == images["cuda" if gpu else "cpu"]
        assert host["Binds"] == ["finescope-cache:/tmp/finescope-cache"] and not host.get("AutoRemove")
        assert settings["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        requests = [(r["Driver"], r["Count"], r["Capabilities"]) for r in host.get("DeviceRequests", [])]
        assert requests == ([("nvidia", -1, [["gpu"]])] if gpu else [])


def test_docker_images_copy_every_file_the_package_build_reads():
    """`pip install .` in the image reads the readme and license files pyproject names: they must be
    copied."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {project["readme"], *project.get("license-files", []), "pyproject.toml"}
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        copied = {
            w
            for line in (ROOT / "docker" / name).read_text().splitlines()
            if line.startswith("COPY ")
            for w in line.split()[1:-1]
        }
        assert needed <= copied, f"{name} does not copy {sorted(needed - copied)}"


def test_cuda_image_installs_the_vllm_extra():
    """`teacher.backend: vllm` runs on CUDA only, so the CUDA image is where it must be installed."""
    dockerfile = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert 'pip install ".[vllm]"' in dockerfile

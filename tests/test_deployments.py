"""The deployment file loads and its parameters are a valid FinescopeConfig for an existing entrypoint."""

from pathlib import Path

import yaml

from finescope_core.config import FinescopeConfig

ROOT = Path(__file__).resolve().parents[1]


def test_deployment_parameters_validate():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert spec["deployments"], "no deployments defined"
    for dep in spec["deployments"]:
        module, func = dep["entrypoint"].split(":")
        assert f"def {func}(" in (ROOT / module).read_text()
        FinescopeConfig.model_validate(dep["parameters"]["config"])
        assert all("cron" in s for s in dep["schedules"])


def test_docker_images_pin_the_same_torch_as_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert "torch==2.13.0" in (ROOT / "docker" / name).read_text()

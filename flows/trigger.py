"""`finescope trigger NAME --section.field value ...`: one run of a deployment with some settings changed.

The run takes the deployment's own `config` parameter with the given fields replaced, checked as a whole
before anything is created, so a typo or an out-of-range value is refused here, not in the run. It
starts the run and returns at once; the process serving the deployment (or its work pool) runs it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from finescope_core.config import ConfigError, FinescopeConfig
from flows.serve import ServeError, prefect_ui_url

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse


def changed_parameters(parameters: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The deployment's parameters with the dotted config `overrides` applied, validated as a FinescopeConfig.

    Raises:
        ConfigError: a field that does not exist or a value it refuses, named with the option to fix.
    """
    config = copy.deepcopy(parameters.get("config") or {})
    for dotted, value in overrides.items():
        *sections, leaf = dotted.split(".")
        node = config
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        checked = FinescopeConfig.model_validate(config)
    except ValidationError as e:
        problems = "; ".join(f"--{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"the deployment's config with these changes is not valid: {problems}") from None
    return {**parameters, "config": checked.model_dump(mode="json")}


def find_deployment(client: SyncPrefectClient, name: str) -> DeploymentResponse:
    """The deployment `flow/deployment`, or the only one named `deployment` whatever its flow."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ServeError(
                f"no deployment {name!r} on this Prefect server; `prefect deployment ls` lists them"
            ) from None
    by_name = DeploymentFilter(name=DeploymentFilterName(any_=[name]))
    found = client.read_deployments(deployment_filter=by_name)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ServeError(
            f"no deployment named {name!r} on this Prefect server; `prefect deployment ls` lists them"
        )
    flows = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
    options = ", ".join(sorted(f"{flows[d.flow_id]}/{d.name}" for d in found))
    raise ServeError(f"{len(found)} deployments are named {name!r} ({options}); give one as FLOW/NAME")


def trigger(name: str, overrides: dict[str, Any]) -> tuple[FlowRun, str]:
    """Start one run of deployment `name` with `overrides` applied to its config.

    Returns:
        The new flow run and the UI address of its page.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    ui = prefect_ui_url()  # refuses a missing or unreachable server, with the steps to start one
    with get_client(sync_client=True) as client:
        deployment = find_deployment(client, name)
        parameters = changed_parameters(deployment.parameters, overrides)
    # timeout 0: start it and return; as_subflow off: a run of its own, not a child of anything here.
    run = run_deployment(deployment.id, parameters=parameters, timeout=0, as_subflow=False)
    assert isinstance(run, FlowRun)  # the synchronous call: a flow run, not a coroutine
    return run, f"{ui}/runs/flow-run/{run.id}"

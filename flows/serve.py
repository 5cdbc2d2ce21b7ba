"""`finescope serve`: one flow as a Prefect deployment, run on a schedule by a long-lived local process.

`prefect.serve` registers the deployment with the Prefect API, then executes its scheduled runs and
the runs started from the UI in subprocesses of this process: the machine that serves is the machine
that computes, with no work pool and no worker.
"""

from __future__ import annotations

import datetime
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finescope_core.config import FinescopeConfig, slug

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

FlowName = Literal["specialize", "curate", "prune"]
FLOWS: dict[str, str] = {
    "specialize": "flows.specialize:specialize_flow",
    "curate": "flows.curate:curate_flow",
    "prune": "flows.prune:prune_flow",
}
DEFAULT_NAME = "finescope"
LOCAL_API = "http://127.0.0.1:4200/api"


class ServeError(ValueError):
    """A `finescope serve` option or environment problem; the message names the input and the fix."""


def schedule(cron: str | None, interval: int | None) -> Schedule | None:
    """The deployment's schedule: a UTC cron, a fixed interval in seconds, or None (runs on demand only)."""
    from prefect.schedules import Cron, Interval

    if cron is not None and interval is not None:
        raise ServeError(
            "--cron and --interval both given; a served deployment takes one schedule, pass only one of them"
        )
    if cron is not None:
        try:
            return Cron(cron, timezone="UTC")
        except ValueError as e:
            raise ServeError(
                f"--cron {cron!r} is not a valid cron string ({e}); give five fields, minute hour "
                f"day-of-month "
                "month day-of-week, quoted, e.g. --cron '0 3 * * 0' for Sundays at 03:00 UTC"
            ) from None
    if interval is not None:
        if interval <= 0:
            raise ServeError(
                f"--interval {interval} must be a positive number of seconds, e.g. --interval 86400 (daily)"
            )
        return Interval(datetime.timedelta(seconds=interval))
    return None


def describe(deployment: RunnerDeployment) -> str:
    """The deployment's schedule in words, for the line printed before serving."""
    if not deployment.schedules:
        return "no schedule: runs start from the UI or `prefect deployment run`"
    sched: Any = deployment.schedules[0].schedule
    if getattr(sched, "cron", None):
        return f"cron '{sched.cron}' {sched.timezone}"
    return f"every {sched.interval.total_seconds():g} s"


def deployment_parameters(cfg: FinescopeConfig) -> dict[str, Any]:
    """`{"config": ...}` as JSON-able values; validates back into an equal FinescopeConfig.

    The config holds no credentials (config validation refuses them), so nothing secret reaches the
    Prefect database, where deployment parameters are kept in plain text.
    """
    return {"config": cfg.model_dump(mode="json")}


def load_flow(flow_name: str) -> Any:
    if flow_name not in FLOWS:
        raise ServeError(f"--flow {flow_name!r} is not a finescope flow; choose one of {', '.join(FLOWS)}")
    module, attr = FLOWS[flow_name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_deployment(
    cfg: FinescopeConfig,
    flow_name: FlowName = "specialize",
    cron: str | None = None,
    interval: int | None = None,
    name: str = DEFAULT_NAME,
) -> RunnerDeployment:
    """The deployment `finescope serve` serves, validated but not registered anywhere.

    Raises:
        ServeError: both or a bad schedule, an unknown flow, a name Prefect refuses.
    """
    from prefect.exceptions import InvalidNameError
    from prefect.types.entrypoint import EntrypointType

    parameters = deployment_parameters(cfg)
    sched = schedule(cron, interval)
    flow = load_flow(flow_name)
    try:
        deployment: RunnerDeployment = flow.to_deployment(
            name,
            schedule=sched,
            parameters=parameters,
            # The run name too: every flow and task run of the deployment carries it (as CLI runs do).
            tags=["finescope", name],
            # A module path resolves wherever the package is installed, unlike a path relative to the cwd.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    except InvalidNameError as e:
        raise ServeError(f"--name {name!r}: {e}") from None
    return deployment


def prefect_ui_url() -> str:
    """The UI URL of the Prefect server the deployment will be registered with, after checking that it is up.

    Without PREFECT_API_URL Prefect would start a temporary server that dies with this process, so
    nobody could see or trigger the deployment: refuse instead.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    api = settings.api.url
    if not api:
        raise ServeError(
            "PREFECT_API_URL is not set, and `finescope serve` needs a Prefect server that outlives it: "
            f"run `prefect server start` in another terminal, then `export PREFECT_API_URL={LOCAL_API}` "
            "and run `finescope serve` again"
        )
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise ServeError(
            f"cannot reach the Prefect API at PREFECT_API_URL={api} ({failure}); start it with "
            f"`prefect server start` or point PREFECT_API_URL at a running server"
        )
    return settings.ui_url or api.removesuffix("/api")


def default_name(config_file: Path | None) -> str:
    """The config file's stem as a run name (`My Math.yaml` -> `my-math`), so each config gets its own
    deployment."""
    return (slug(config_file.stem) if config_file is not None else None) or DEFAULT_NAME


def serve(
    cfg: FinescopeConfig, flow_name: FlowName, cron: str | None, interval: int | None, name: str
) -> None:
    """Validate everything, then serve the deployment until interrupted (Ctrl-C or SIGTERM)."""
    import prefect

    deployment = build_deployment(cfg, flow_name, cron, interval, name)
    ui = prefect_ui_url()
    full_name = f"{deployment.flow_name}/{deployment.name}"
    print(
        f"serving deployment '{full_name}' ({describe(deployment)}); "
        f"UI: {ui}/deployments; run now: prefect deployment run '{full_name}'; stop: Ctrl-C",
        flush=True,
    )
    # limit=1: runs of one config share a store and would only compete for the same CPU/GPU; a run that
    # comes due while another is running waits for it.
    prefect.serve(deployment, limit=1, print_starting_message=False)

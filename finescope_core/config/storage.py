"""The `storage` section: how to reach an object-store artifact store (never its credentials)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from finescope_core.config.base import Strict


class StorageConfig(Strict):
    """How to reach the artifact store when it is an object store (`s3://...`).

    Credentials never live in the config: a config is written into run.json, shell history (as a
    command-line option) and the Prefect database (as deployment parameters). They come from the
    standard AWS variables / profile, or from a Prefect Secret block named here.
    """

    endpoint_url: str | None = None
    """S3 endpoint (MinIO, Ceph, SeaweedFS...). None: AWS, or the AWS_ENDPOINT_URL variable."""
    region: str | None = None
    """Region name, if the endpoint needs one."""
    secret_block: str | None = None
    """Name of a Prefect Secret block whose value is `{"key": ACCESS_KEY_ID, "secret": SECRET_ACCESS_KEY}`.
    None: the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or profile."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        if isinstance(value, dict):
            given = [f"storage.{name}" for name in ("key", "secret") if name in value]
            if given:
                raise ValueError(
                    f"{' and '.join(given)}: credentials are not read from the config (it is saved in "
                    "run.json, shell history and the Prefect database); export AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY, "
                    'or save a Prefect Secret block with {"key": ..., "secret": ...} and name it in '
                    "storage.secret_block"
                )
        return value

    def fsspec_options(self, credentials: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Options for `fsspec.filesystem('s3', **options)`.

        Args:
            credentials: `{"key", "secret"}` read from `secret_block` by the caller; None leaves them to
                the AWS variables / profile, which s3fs reads itself.
        """
        opts: dict[str, Any] = dict(credentials or {})
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        return opts

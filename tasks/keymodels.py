"""What a stage's cache key is made of: the typed key model every stage declares, and its spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from finescope_core.code_identity import code_digest
from finescope_core.config import FinescopeConfig
from finescope_core.store import (
    cache_key,
)
from tasks.identity import Precision, work_precision


@dataclass(frozen=True)
class StageKey:
    """What a stage's cache key is made of. Each task builds its own with a `*_key` function, and
    `finescope store plan` calls the same functions, so the plan cannot drift from what runs."""

    stage: str
    version: str
    config: Any
    inputs: dict[str, str]

    @property
    def key(self) -> str:
        return cache_key(self.stage, self.version, self.config, self.inputs)


class StageKeyModel(BaseModel):
    """A stage's cache key, typed: the config fields the stage reads, derived settings, its inputs' hashes.

    Subclasses name their stage and `VERSION` (bump it when the stage's output changes for the same
    key), and map each config-derived field to the dotted config field it copies (`CONFIG`). Fields
    computed from config fields (the resolved `layers`, a shard's rows) name their sources in
    `DERIVED`. The key is a hash of the full `model_dump()`, so a field cannot be left out of it by
    accident; `tests/flows/test_keys.py` walks every config field against `reads()`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    STAGE: ClassVar[str]
    VERSION: ClassVar[str]
    CONFIG: ClassVar[dict[str, str]] = {}
    """Key field -> the dotted config field it copies."""
    DERIVED: ClassVar[tuple[str, ...]] = ()
    """Dotted config fields that reach the key through a derived field."""

    inputs: dict[str, str]
    """Content hashes of the stage's inputs (artifacts, models, data)."""

    @classmethod
    def reads(cls) -> set[str]:
        """Every config field that changes this stage's key."""
        return set(cls.CONFIG.values()) | set(cls.DERIVED)

    @classmethod
    def of(cls, cfg: Any, inputs: dict[str, str], **derived: Any) -> Self:
        """The key of this stage for `cfg` (a `FinescopeConfig`, or the sections and run fields a task holds:
        `RunContext.settings`), its inputs and its derived settings."""
        fields = {name: config_value(cfg, dotted) for name, dotted in cls.CONFIG.items()}
        return cls(**fields, **derived, inputs=inputs)

    CODE: ClassVar[tuple[str, ...]] = ()
    """Modules that implement the stage; with the key model's own module and every package module they
    import, their source is hashed into the key (`code_digest`), so changed code never reuses an artifact."""

    @classmethod
    def code(cls) -> str:
        """Hash of the source of the modules that implement this stage."""
        return code_digest((cls.__module__, *cls.CODE))

    def spec(self) -> StageKey:
        inputs = {**self.inputs, "code": self.code()}
        return StageKey(self.STAGE, self.VERSION, self.model_dump(mode="json", exclude={"inputs"}), inputs)


class ModelStageKey(StageKeyModel):
    """The key of a stage that runs a model: it also holds the device kind and dtype the work ran in
    (`tasks.identity.Precision`), so a bf16 or GPU artifact is never served to a float32 CPU run.

    The precision is resolved where the work runs (`work_precision`, inside the task); a stage that
    gathers parts run elsewhere passes theirs. Subclasses list `device` and `model_dtype` in `DERIVED`.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("device", "model_dtype")

    device: str
    dtype: str

    @classmethod
    def of(cls, cfg: Any, inputs: dict[str, str], precision: Precision | None = None, **derived: Any) -> Self:
        ran = precision or work_precision(cfg)
        return super().of(cfg, inputs, **{"device": ran.device, "dtype": ran.dtype, **derived})


def compute_dtype(cfg: FinescopeConfig) -> str:
    """The dtype name model work in this process runs in (`work_precision`'s dtype)."""
    return work_precision(cfg).dtype


def config_value(cfg: Any, dotted: str) -> Any:
    """The value of a dotted config field (a section comes back as a plain dict)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

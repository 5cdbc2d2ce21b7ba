"""Typed configuration: one pydantic model per stage, composed into `FinescopeConfig`.

The CLI, the YAML file and the Prefect flow parameters all use these models. Every field's
docstring is its help text (`finescope curate --help` prints them).

One module per section (`storage`, `curate` with its `sae` sub-section, `prune`, `recover`, `teacher`,
`finetune`, `evaluate`, `orchestration`), the whole run's model (`finescope`), and the loader
(`loading`: YAML, overrides, relative paths, errors). Import the names from here.
"""

from finescope_core.config.base import NAME_OR_PATH, PATH
from finescope_core.config.curate import CurateConfig, SAEConfig
from finescope_core.config.evaluate import EvalConfig
from finescope_core.config.finescope import FinescopeConfig, slug
from finescope_core.config.finetune import KD_TEMPERATURE, KD_WEIGHT, FinetuneConfig
from finescope_core.config.loading import ConfigError, load_config, path_fields, resolve_config_paths
from finescope_core.config.orchestration import OrchestrationConfig
from finescope_core.config.prune import PruneConfig
from finescope_core.config.recover import RECOVER_TOKENS, RecoverConfig
from finescope_core.config.storage import StorageConfig
from finescope_core.config.teacher import TeacherConfig

__all__ = [
    "KD_TEMPERATURE",
    "KD_WEIGHT",
    "RECOVER_TOKENS",
    "NAME_OR_PATH",
    "PATH",
    "ConfigError",
    "CurateConfig",
    "EvalConfig",
    "FinescopeConfig",
    "FinetuneConfig",
    "OrchestrationConfig",
    "PruneConfig",
    "RecoverConfig",
    "SAEConfig",
    "StorageConfig",
    "TeacherConfig",
    "load_config",
    "path_fields",
    "resolve_config_paths",
    "slug",
]

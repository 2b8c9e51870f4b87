"""Run settings: the typed schema (``schema``) and loading it from YAML with overrides (``loader``)."""

from lmtune.config.loader import (
    apply_overrides,
    load_config,
    parse_override_args,
    parse_value,
    save_config,
)
from lmtune.config.schema import (
    PRECISIONS,
    BaselineConfig,
    Config,
    DataConfig,
    DistributedConfig,
    GenerationConfig,
    GRPOConfig,
    MethodConfig,
    ModelConfig,
    PreferenceConfig,
    TrainConfig,
)

__all__ = [
    "PRECISIONS",
    "BaselineConfig",
    "Config",
    "DataConfig",
    "DistributedConfig",
    "GRPOConfig",
    "GenerationConfig",
    "MethodConfig",
    "ModelConfig",
    "PreferenceConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_override_args",
    "parse_value",
    "save_config",
]

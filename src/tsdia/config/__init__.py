"""Typed configuration: schema, YAML loading with file:line errors, and command-line overrides."""

from tsdia.config.loader import apply_override, effective_yaml, load_config
from tsdia.config.schema import (
    CheckpointConfig,
    ComponentConfig,
    Config,
    ConfigSource,
    DeepSpeedConfig,
    DistributedConfig,
    LoggingConfig,
    SlurmConfig,
    TrainingConfig,
    ValidationConfig,
)

__all__ = [
    "CheckpointConfig",
    "ComponentConfig",
    "Config",
    "ConfigSource",
    "DeepSpeedConfig",
    "DistributedConfig",
    "LoggingConfig",
    "SlurmConfig",
    "TrainingConfig",
    "ValidationConfig",
    "apply_override",
    "effective_yaml",
    "load_config",
]

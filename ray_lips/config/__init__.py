"""The experiment configuration: the schema (pure data, ``schema``) and the checks that read
files or import the user's code before any Ray work starts (``checks``)."""

from ray_lips.config.schema import (
    DATASETS,
    MODELS,
    SAFE_NAME,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ResourcesConfig,
    TrainConfig,
    apply_overrides,
    flatten_keys,
    is_import_path,
    load_config,
    parse_value,
    read_yaml,
    set_key,
    set_keys,
    validate_config,
)

__all__ = ["DATASETS", "MODELS", "SAFE_NAME", "ConfigError", "DataConfig", "ExperimentConfig",
           "ResourcesConfig", "TrainConfig", "apply_overrides", "flatten_keys", "is_import_path",
           "load_config",
           "parse_value", "read_yaml", "set_key", "set_keys", "validate_config"]

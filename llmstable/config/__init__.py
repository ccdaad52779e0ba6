"""Typed run configuration. Past the CLI, code only sees these dataclasses; they are the one source of every
default (the YAML files in `configs/` only choose and change values, see tests/config/test_defaults.py).

- `checks`: `ConfigError` and the small checks every schema validates itself with;
- `model`, `data`, `optimizer`, `stabilizer`: the schemas of those config groups (optimizer variants register
  themselves by name);
- `run`: the schedule, loop, logging, fault and engine sections, and `TrainConfig`, the whole run;
- `loader`: `load_config` (a composed mapping -> a validated `TrainConfig`, every problem in one error),
  `to_dict`, `schema_keys`, and the schema's registration with Hydra.
"""

from llmstable.config.checks import ConfigError
from llmstable.config.data import DataConfig, TokenizerConfig
from llmstable.config.loader import flatten, load_config, register_schemas, schema_keys, to_dict
from llmstable.config.loss import CrossEntropyConfig, LossConfig, SphericalZConfig, StableMaxConfig
from llmstable.config.model import ModelConfig
from llmstable.config.optimizer import (
    AdamMiniConfig, AdamW8bitConfig, AdamWConfig, FiraConfig, LionConfig, MuonConfig, OptimizerConfig, S3Config,
    SOAPConfig, SPAMConfig, StableSPAMConfig, register,
)
from llmstable.config.run import (
    DistributedConfig, FaultConfig, LoggingConfig, ScheduleConfig, TrainConfig, TrainLoopConfig,
)
from llmstable.config.stabilizer import (
    EmbGradShrinkConfig, NormGrowthLimiterConfig, OrthoGradConfig, QKClipConfig, QKNormConfig, Quant4Config,
    SoftmaxCollapseConfig, SpikeGuardConfig, StabilizerConfig, UpdateClipConfig, ZLossConfig,
)

__all__ = [
    "AdamMiniConfig", "AdamW8bitConfig", "AdamWConfig", "ConfigError", "CrossEntropyConfig", "LionConfig",
    "LossConfig", "MuonConfig", "SOAPConfig", "SoftmaxCollapseConfig", "SphericalZConfig", "StableMaxConfig",
    "DataConfig", "DistributedConfig", "EmbGradShrinkConfig",
    "FaultConfig", "FiraConfig", "LoggingConfig", "ModelConfig", "NormGrowthLimiterConfig", "OptimizerConfig",
    "OrthoGradConfig", "QKClipConfig", "QKNormConfig", "Quant4Config", "S3Config", "SPAMConfig",
    "ScheduleConfig", "SpikeGuardConfig", "StabilizerConfig", "StableSPAMConfig", "TokenizerConfig", "TrainConfig",
    "TrainLoopConfig", "UpdateClipConfig", "ZLossConfig", "flatten", "load_config", "register", "register_schemas", "schema_keys", "to_dict",
]

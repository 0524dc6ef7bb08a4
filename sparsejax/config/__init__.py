"""The config schema: a leaf package (imports no jax, flax, optax or layer module).

``schema``: the core sections and ``Config`` (family sections are added by the layer families
through ``sparsejax.configure``); ``build``: dict -> dataclasses, core checks, defaults and the
resume comparison. Validation that needs the registries is ``sparsejax.configure.validate``.
"""

from sparsejax.config.build import (build_config, core_checks, defaults_dict, resume_changes,
                                    with_overrides)
from sparsejax.config.schema import (CORE_SECTIONS, AttentionConfig, Config, DataConfig,
                                     FFNConfig, MeshConfig, ModelConfig, OptimConfig,
                                     TrainConfig, field, parse_overrides)
from sparsejax.errors import ConfigError

__all__ = ["CORE_SECTIONS", "AttentionConfig", "Config", "ConfigError", "DataConfig",
           "FFNConfig", "MeshConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "build_config", "core_checks", "defaults_dict", "field", "parse_overrides",
           "resume_changes", "with_overrides"]

"""The job configuration tree (pydantic v2, torch-free) and its loader."""

from tidal.config.loader import ConfigError, apply_overrides, config_from_dict, load_config
from tidal.config.schema import JobConfig

__all__ = ["ConfigError", "JobConfig", "apply_overrides", "config_from_dict", "load_config"]

"""grok1: fast, faithful, sharded inference for xAI's Grok-1 in JAX."""

from grok1.api import Model, load
from grok1.config import ModelConfig

__all__ = ["Model", "ModelConfig", "load"]

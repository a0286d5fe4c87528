"""Levante: an open foundry for DeepSeek-V3-class sparse MoE language models."""

from levante.config import ConfigError, ModelConfig, TrainConfig

__version__ = "0.1.0"


def __getattr__(name):
    # Import the torch-heavy parts lazily so `levante --help` and config tooling stay fast.
    if name == "Transformer":
        from levante.model.transformer import Transformer

        return Transformer
    if name == "from_pretrained":
        from levante.interop.load import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'levante' has no attribute {name!r}")


__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "Transformer", "from_pretrained", "__version__"]

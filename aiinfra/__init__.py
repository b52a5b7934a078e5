"""aiinfra: the AI-infrastructure stack, real and runnable from one CPU to a GPU cluster."""

from aiinfra.models import ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "__version__"]

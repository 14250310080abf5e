"""evomerge: evolutionary search over model-merge recipes.

Importing the package is cheap: heavy dependencies (torch, transformers, ray,
lm-eval) are imported by the modules and commands that use them.
"""

__version__ = "0.1.0"

from evomerge.errors import EvomergeError

__all__ = ["EvomergeError", "__version__"]

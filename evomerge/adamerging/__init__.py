"""AdaMerging: merge coefficients learned by entropy minimisation on unlabeled inputs."""

from evomerge.adamerging.merge import (
    GRANULARITIES,
    FunctionalMerge,
    coefficients_from_recipe,
    recipe_for,
)
from evomerge.adamerging.train import (
    AdaMergingResult,
    AdaMergingSettings,
    EntropyTask,
    adamerge,
    prediction_entropy,
)

__all__ = [
    "GRANULARITIES",
    "AdaMergingResult",
    "AdaMergingSettings",
    "EntropyTask",
    "FunctionalMerge",
    "adamerge",
    "coefficients_from_recipe",
    "prediction_entropy",
    "recipe_for",
]

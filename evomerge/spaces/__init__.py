"""Search spaces: the YAML a user writes, and the genomes that decode to recipes."""

from evomerge.spaces.genome import Gene, Genome
from evomerge.spaces.space import SearchSpace

__all__ = ["Gene", "Genome", "SearchSpace"]

"""A search space: the YAML a user writes to launch a search, validated before any heavy work.

::

    name: zoo-small-ties
    models:
      base: zoo:lm/small/base          # a path, or zoo:KIND/SIZE/MEMBER
      sources: [zoo:lm/small/shift, zoo:lm/small/rev, zoo:lm/small/sort]
    genome: {type: parameter, method: ties, layer_groups: 1}
    objective: {evaluators: [...], fitness: [...]}     # see evomerge.evaluation.objective
    optimizer: {name: cmaes}                            # see evomerge.optimize
    budget: 40                                          # evaluations
    workers: 1
    seed: 0

``resolved()`` returns the same space with every reference (models, anchor,
``include_path``/``path`` settings of evaluators) turned into an absolute path;
that is what a run directory freezes, so a resumed run never depends on the
working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import EvomergeError, prefixed
from evomerge.evaluation.objective import Objective, Surrogate
from evomerge.spaces.dataflow import DataflowGenomeConfig
from evomerge.spaces.genome import Genome
from evomerge.spaces.models import PoolModel, open_pool, resolve_ref
from evomerge.spaces.parameter import ParameterGenome, ParameterGenomeConfig
from evomerge.yamlconfig import parse_yaml, read_text, validate, with_overrides

#: Evaluator settings that name files or directories (resolved like model references).
PATH_SETTINGS = ("include_path", "path", "test_path", "data", "head_from", "paths", "heads_from")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Strict):
    """Base model and the sources merged into it (paths or ``zoo:`` references)."""

    base: str
    sources: list[str] = Field(min_length=1)


class StagedGenomeConfig(_Strict):
    """Sakana's staged recipe: a parameter-space search, then a data-flow search over its winner."""

    type: Literal["staged"] = "staged"
    parameter: ParameterGenomeConfig
    dataflow: DataflowGenomeConfig
    #: evaluations given to the parameter stage; the rest of ``budget`` goes to the data-flow stage.
    parameter_budget: int = Field(gt=0, strict=True)


class OptimizerConfig(_Strict):
    """Which ask/tell backend and its settings (see ``evomerge.optimize``)."""

    name: str = "cmaes"
    settings: dict[str, Any] = Field(default_factory=dict)


GenomeConfig = Annotated[
    ParameterGenomeConfig | DataflowGenomeConfig | StagedGenomeConfig, Field(discriminator="type")
]


class SearchSpace(_Strict):
    """See the module doc."""

    #: the run's directory name under runs/ (a name, not a path)
    name: str
    description: str = ""
    models: ModelsConfig
    genome: GenomeConfig
    objective: Objective
    #: optional screening of asked batches by a cheap score (see ``evomerge.run.screening``)
    surrogate: Surrogate | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: int = Field(gt=0, strict=True)
    workers: int = Field(1, ge=1, strict=True)
    #: optimizers (pycma, Optuna) take seeds in [0, 2**32)
    seed: int = Field(0, ge=0, lt=2**32, strict=True)
    #: where workers merge and evaluate: cuda when the cluster has GPUs, else cpu (default: auto).
    device: Literal["cpu", "cuda"] | None = None
    #: where each worker keeps the source weights (see ``evomerge.materialize.placement``): auto picks
    #: device, host (pinned, streamed per block) or disk from the model sizes and free memory
    placement: Literal["auto", "device", "host", "disk"] = "auto"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", v):
            raise ValueError(f"must be a plain directory name (letters, digits, and . _ + - after the first), "
                             f"not a path or blank: got {v!r}")
        return v

    @model_validator(mode="after")
    def _stages_fit_the_budget(self) -> SearchSpace:
        # checked when the file is read: found after the parameter stage, it would waste that stage
        if isinstance(self.genome, StagedGenomeConfig) and self.budget <= self.genome.parameter_budget:
            raise ValueError(f"budget {self.budget} leaves nothing for the data-flow stage after "
                             f"genome.parameter_budget {self.genome.parameter_budget}; raise budget or lower it")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpace:
        """Read and validate a search-space YAML file."""
        text = read_text(path)
        return validate(cls, parse_yaml(text, str(path), "genome"), text, str(path))

    def with_overrides(self, **overrides: Any) -> SearchSpace:
        """A copy with CLI overrides (``None`` values ignored), validated again."""
        return with_overrides(self, overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def resolved(self, *, relative_to: Path | None = None, progress=None) -> SearchSpace:
        """The space with references made absolute (building zoo models on first use)."""
        def ref(r: str, key: str | None = None) -> str:
            return resolve_ref(r, relative_to=relative_to, progress=progress, key=key)

        data = self.model_dump(mode="json")
        data["models"] = {"base": ref(self.models.base, "models.base"),
                          "sources": [ref(s, f"models.sources[{i}]") for i, s in enumerate(self.models.sources)]}
        sources = data["models"]["sources"]
        for j, path in enumerate(sources):
            if path in sources[:j]:
                raise EvomergeError(f"models.sources[{j}]: {self.models.sources[j]!r} is models.sources"
                                    f"[{sources.index(path)}] again; list each source once")
        genome = data["genome"]
        for g in (genome, genome.get("dataflow") or {}):
            if g.get("anchor"):
                g["anchor"] = ref(g["anchor"], "genome.anchor")
        surrogate = (data.get("surrogate") or {}).get("evaluators", [])
        for where, specs in (("objective", data["objective"]["evaluators"]), ("surrogate", surrogate)):
            for i, spec in enumerate(specs):
                at = f"{where}.evaluators[{i}]"
                for key in PATH_SETTINGS:
                    if isinstance(spec.get(key), str):
                        spec[key] = ref(spec[key], f"{at}.{key}")
                    elif isinstance(spec.get(key), list):
                        spec[key] = [ref(v, f"{at}.{key}[{j}]") if isinstance(v, str) else v
                                     for j, v in enumerate(spec[key])]
                module, sep, fn = str(spec.get("function", "")).rpartition(":")
                if spec["type"] == "python" and sep and module.endswith(".py"):
                    spec["function"] = f"{ref(module, f'{at}.function')}:{fn}"
        return type(self).model_validate(data)

    def pool(self) -> tuple[PoolModel, list[PoolModel]]:
        """Open the (resolved) models: base and sources, checked to be mergeable."""
        return open_pool(self.models.base, list(self.models.sources))

    def check(self, source: str = "search space") -> None:
        """Validate what a run would only meet later (genome, optimizer, evaluator settings), before any
        run dir exists; errors name ``source`` (the file) and the key at fault."""
        import tempfile

        from evomerge.evaluation.registry import build_evaluator
        from evomerge.optimize import build_optimizer

        def at(key: str):
            return prefixed(f"{source}: {key}")

        staged = isinstance(self.genome, StagedGenomeConfig)
        with at("genome.parameter" if staged else "genome"):
            genome = self.stage(0).build_genome() if staged else self.build_genome()
            if isinstance(genome, ParameterGenome):
                genome.check_plan()
        if staged:
            # the data-flow stage also merges stage 1's winner, unknown until then: checked over the sources
            with at("genome.dataflow"):
                stored = self.stage(1).build_genome().stored
            dtype = self.genome.parameter.dtype
            if dtype is not None and stored != {dtype}:
                raise EvomergeError(f"{source}: genome.parameter.dtype: stage 1 exports its winner in {dtype}, which "
                                    f"the data-flow stage stacks with the sources' layers ({', '.join(sorted(stored))}); "
                                    "a path takes one dtype: leave dtype out")
        with at("optimizer"), tempfile.TemporaryDirectory() as scratch:
            build_optimizer(self.optimizer.name, dim=genome.dim, names=genome.names,
                            directions=self.objective.directions, seed=self.seed, state_dir=Path(scratch),
                            settings=dict(self.optimizer.settings))
        for where, specs in (("objective", self.objective.evaluators),
                             ("surrogate", self.surrogate.evaluators if self.surrogate else [])):
            for i, spec in enumerate(specs):
                with at(f"{where}.evaluators[{i}]"):
                    build_evaluator(spec)

    def build_genome(self) -> Genome:
        """The genome of a single-stage space (staged spaces build one per stage)."""
        if isinstance(self.genome, StagedGenomeConfig):
            raise EvomergeError("a staged genome runs as two stages; build each stage's genome")
        base, sources = self.pool()
        return self.genome.build(base, sources, self.seed)

    def stage(self, index: int, *, winner: str | None = None) -> SearchSpace:
        """Stage ``index`` (0: parameter, 1: data-flow) of a staged space as a plain space.

        The data-flow stage searches over the parameter stage's exported
        ``winner`` plus the sources, anchored on the winner unless the space
        names another anchor.
        """
        g = self.genome
        if not isinstance(g, StagedGenomeConfig):
            raise EvomergeError("not a staged space")
        data = self.model_dump(mode="json")
        if index == 0:
            data["genome"] = g.parameter.model_dump(mode="json")
            data["budget"] = g.parameter_budget
        else:
            if self.budget <= g.parameter_budget:
                raise EvomergeError(
                    f"budget {self.budget} leaves nothing for the data-flow stage after parameter_budget {g.parameter_budget}"
                )
            data["genome"] = g.dataflow.model_dump(mode="json")
            if winner is not None:
                data["models"]["sources"] = [winner, *self.models.sources]
                data["genome"]["anchor"] = g.dataflow.anchor or winner
            data["budget"] = self.budget - g.parameter_budget
        data["name"] = f"{self.name}-stage{index + 1}"
        return type(self).model_validate(data)

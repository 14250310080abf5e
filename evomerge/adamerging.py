"""AdaMerging: merge coefficients learned by minimising prediction entropy on unlabeled inputs.

Yang et al. (ICLR 2024) merge task vectors ``tau_k = theta_k - theta_base`` as
``theta = theta_base + sum_k lambda_k tau_k`` and learn the ``lambda`` by Adam on
the Shannon entropy of the merged model's predictions, summed over tasks, on
unlabeled inputs of each task. No labels are used.

Granularity of the coefficients:

``task``
    one ``lambda`` per task (task-wise AdaMerging);
``layer``
    one per task per decoder layer, plus one for the global tensors (embeddings,
    final norm);
``tensor``
    one per task per parameter tensor (what the reference code calls layer-wise).

**AdaMerging++** starts from TIES-trimmed task vectors (top ``density`` by
magnitude per tensor) and keeps, per entry, only the task vectors whose sign
agrees with the elected sign. The sign is elected on the ``lambda``-weighted sum,
exactly as mergekit's ``ties`` with ``normalize: false`` does, so the exported
recipe reproduces the trained model (the reference code elects once on the
unweighted sum).

The merge is functional: every step computes the merged tensors from the
coefficients and runs the one live model through ``torch.func.functional_call``,
so gradients reach the coefficients without copying the model. Tasks that keep
their own classification head (the multi-head vision setting) name those
tensors in :attr:`EntropyTask.head`; they are excluded from merging and swapped
in per task. The result is a mergekit recipe (``task_arithmetic``, or ``ties``
for ++) whose per-layer / per-tensor weights are ``{filter, value}`` lists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

GRANULARITIES = ("task", "layer", "tensor")
#: Group label of the tensors outside the decoder layers under ``layer`` granularity.
GLOBALS = "globals"


class AdaMergingSettings(BaseModel):
    """Training settings; defaults follow the reference code (Adam 1e-3, init 0.3, 500 steps, batch 16, clamp)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    granularity: Literal["task", "layer", "tensor"] = "layer"
    plus_plus: bool = False
    density: float = Field(0.2, gt=0, le=1)
    lr: float = Field(1e-3, gt=0)
    init: float = 0.3
    steps: int = Field(500, ge=0)
    batch_size: int = Field(16, ge=1)
    clamp: bool = True
    seed: int = 0


@dataclass
class EntropyTask:
    """One task's unlabeled inputs and, in the multi-head setting, its head tensors.

    ``inputs`` maps model keyword arguments to tensors whose first dimension
    indexes samples (``pixel_values``; or left-padded ``input_ids`` and
    ``attention_mask``, whose last position is scored).
    """

    name: str
    source: str
    inputs: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


@dataclass
class AdaMergingResult:
    """Learned coefficients (``[tasks, groups]``, clamped as used) and how training went."""

    coefficients: torch.Tensor
    groups: list[str]
    sources: list[str]
    losses: list[float]
    initial_entropy: float
    final_entropy: float
    stopped: str | None
    recipe: Recipe


def load_model(path: str | Path, device: str = "cpu"):
    """The HF model class named by ``config.json``'s ``architectures`` (no remote code)."""
    import transformers

    from evomerge.fsutil import read_json

    transformers.utils.logging.disable_progress_bar()

    config = read_json(Path(path) / "config.json", f"{path}: not a model directory (no config.json)")
    names = config.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise EvomergeError(f"{path}/config.json: architectures {names} names no transformers model class")
    return model_class.from_pretrained(str(path)).to(device).eval()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the predicted distribution; sequence logits use their last position."""
    if logits.dim() == 3:
        logits = logits[:, -1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class FunctionalMerge:
    """Merged tensors as a differentiable function of the coefficients.

    Holds the base tensors and the stacked (for ++, trimmed) task vectors of
    every merged tensor once, on the model's device.
    """

    def __init__(self, base_dir: str | Path, sources: list[str | Path], *, granularity: str,
                 plus_plus: bool = False, density: float = 0.2, exclude: set[str] = frozenset(),
                 device: str = "cpu") -> None:
        from evomerge.io.model_dir import ModelDir
        from evomerge.methods import sparsify

        if granularity not in GRANULARITIES:
            raise EvomergeError(f"adamerging: granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
        base = ModelDir(base_dir)
        models = [ModelDir(s) for s in sources]
        self.arch = base.arch
        self.plus_plus = plus_plus
        self.density = density
        self.names: list[str] = []
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        for name in base.names:
            if name in exclude:
                continue
            for m in models:
                if name not in m.infos:
                    raise EvomergeError(f"{m.path}: tensor {name!r} of the base model is missing")
                if m.infos[name].shape != base.infos[name].shape:
                    raise EvomergeError(
                        f"{m.path}: tensor {name!r} has shape {list(m.infos[name].shape)}, "
                        f"the base has {list(base.infos[name].shape)}"
                    )
            b = base.tensor(name).to(device=device, dtype=torch.float32)
            stacked = torch.stack([m.tensor(name).to(device=device, dtype=torch.float32) - b for m in models])
            if plus_plus:
                for row in stacked:
                    sparsify.magnitude(row, density)
            self.names.append(name)
            self.base[name] = b
            self.deltas[name] = stacked
        self.groups, self.group_of = _groups(self.names, self.arch, granularity)
        self.num_sources = len(models)

    def tensors(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for ``coefficients`` (``[sources, groups]``), differentiable in them."""
        out = {}
        for name in self.names:
            lam = coefficients[:, self.group_of[name]]
            delta = self.deltas[name]
            weighted = lam.view(-1, *([1] * (delta.dim() - 1))) * delta
            if self.plus_plus:
                # mergekit ties, normalize false: keep each entry's agreeing (weighted) deltas
                elected = weighted.detach().sum(0).sign().add(0.5).sign()
                mixed = (weighted * elected).relu().sum(0) * elected
            else:
                mixed = weighted.sum(0)
            out[name] = self.base[name] + mixed
        return out


def _groups(names: list[str], arch, granularity: str) -> tuple[list[str], dict[str, int]]:
    """Coefficient groups and each tensor's group index."""
    if granularity == "task":
        return ["all"], {n: 0 for n in names}
    if granularity == "tensor":
        return list(names), {n: i for i, n in enumerate(names)}
    layers = sorted({arch.layer_of(n) for n in names} - {None})
    labels = [GLOBALS] + [f"{arch.layer_prefix}{i}." for i in layers]
    index = {label: i for i, label in enumerate(labels)}
    return labels, {n: index[GLOBALS if arch.layer_of(n) is None else f"{arch.layer_prefix}{arch.layer_of(n)}."]
                    for n in names}


def adamerge(base: str | Path, tasks: list[EntropyTask], settings: AdaMergingSettings | None = None, *,
             init: torch.Tensor | None = None, device: str | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``tasks`` (one fine-tuned source each) on top of ``base``.

    ``init`` (``[tasks, groups]``) overrides the constant ``settings.init``,
    e.g. with an evolved recipe's weights (see :func:`coefficients_from_recipe`).
    ``progress`` gets (step, steps, loss). A non-finite loss stops training with
    the last good coefficients; the result's ``stopped`` says so.
    """
    settings = settings or AdaMergingSettings()
    if not tasks:
        raise EvomergeError("adamerging: no tasks given")
    for task in tasks:
        if not task.inputs or task.size == 0:
            raise EvomergeError(f"adamerging: task {task.name!r} has no unlabeled inputs")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(base, device)
    for p in model.parameters():
        p.requires_grad_(False)
    heads = _check_heads(tasks, model)
    merge = FunctionalMerge(base, [t.source for t in tasks], granularity=settings.granularity,
                            plus_plus=settings.plus_plus, density=settings.density, exclude=heads, device=device)
    shape = (len(tasks), len(merge.groups))
    if init is None:
        raw = torch.full(shape, float(settings.init), device=device)
    elif tuple(init.shape) != shape:
        raise EvomergeError(f"adamerging: init coefficients have shape {list(init.shape)}, expected {list(shape)}")
    else:
        raw = init.detach().to(device=device, dtype=torch.float32).clone()
    raw.requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    task_heads = [{k: v.to(device) for k, v in t.head.items()} for t in tasks]

    def coefficients() -> torch.Tensor:
        return raw.clamp(0, 1) if settings.clamp else raw

    def loss_on(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        merged = merge.tensors(coefficients())
        total = torch.zeros((), device=device)
        for head, batch in zip(task_heads, batches):
            out = torch.func.functional_call(model, {**merged, **head}, args=(), kwargs=batch)
            total = total + prediction_entropy(out.logits)
        return total

    def sample() -> list[dict[str, torch.Tensor]]:
        batches = []
        for task in tasks:
            index = torch.randperm(task.size, generator=generator)[: settings.batch_size]
            batches.append({k: v[index].to(device) for k, v in task.inputs.items()})
        return batches

    probe = [{k: v.to(device) for k, v in t.inputs.items()} for t in tasks]
    with torch.no_grad():
        initial = float(loss_on(probe)) / len(tasks)
    losses: list[float] = []
    stopped = None
    good = raw.detach().clone()
    for step in range(settings.steps):
        loss = loss_on(sample())
        if not torch.isfinite(loss):
            stopped = f"loss became {float(loss)} at step {step + 1}; kept the coefficients of step {step}"
            log.warning("adamerging: %s", stopped)
            break
        good = raw.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
    with torch.no_grad():
        if stopped is None:
            good = raw.detach().clone()
        raw.copy_(good)
        learned = coefficients().detach().cpu()
        final = float(loss_on(probe)) / len(tasks)
    sources = [t.source for t in tasks]
    recipe = recipe_for(base, sources, learned, merge.groups, settings, heads=sorted(heads))
    return AdaMergingResult(learned, merge.groups, sources, losses, initial, final, stopped, recipe)


def _check_heads(tasks: list[EntropyTask], model) -> set[str]:
    """Head tensor names (all tasks must name the same ones) checked against the live model."""
    names = set(tasks[0].head)
    own = dict(model.named_parameters())
    for task in tasks:
        if set(task.head) != names:
            raise EvomergeError(
                f"adamerging: task {task.name!r} has head tensors {sorted(task.head)}, "
                f"task {tasks[0].name!r} has {sorted(names)}"
            )
        for name, tensor in task.head.items():
            if name not in own:
                raise EvomergeError(f"adamerging: task {task.name!r}: head tensor {name!r} is not in the base model")
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise EvomergeError(
                    f"adamerging: task {task.name!r}: head tensor {name!r} has shape {list(tensor.shape)}, "
                    f"the model expects {list(own[name].shape)}"
                )
    return names


def _weight_value(row: torch.Tensor, groups: list[str], granularity: str, heads: list[str]):
    """One source's ``weight`` parameter: a scalar, or a ``{filter, value}`` list."""
    values = [round(float(v), 6) for v in row]
    entries = [{"filter": h, "value": 0.0} for h in heads]
    if granularity == "task":
        if not entries:
            return values[0]
        return [*entries, {"value": values[0]}]
    if granularity == "tensor":
        # Longest names first: a name that is a substring of another must not capture it.
        order = sorted(range(len(groups)), key=lambda i: -len(groups[i]))
        entries += [{"filter": groups[i], "value": values[i]} for i in order]
        return entries
    entries += [{"filter": g, "value": v} for g, v in zip(groups[1:], values[1:])]
    return [*entries, {"value": values[0]}]


def recipe_for(base: str | Path, sources: list[str], coefficients: torch.Tensor, groups: list[str],
               settings: AdaMergingSettings, *, heads: list[str] = ()) -> Recipe:
    """The mergekit recipe that reproduces the merge for ``coefficients``.

    Head tensors get weight 0, so the merged model keeps the base's head.
    """
    models = []
    for source, row in zip(sources, coefficients):
        params = {"weight": _weight_value(row, groups, settings.granularity, list(heads))}
        if settings.plus_plus:
            params["density"] = settings.density
        models.append({"model": str(source), "parameters": params})
    method = "ties" if settings.plus_plus else "task_arithmetic"
    parameters = {"normalize": False, "lambda": 1.0}
    return Recipe.model_validate({"merge_method": method, "base_model": str(base), "models": models,
                                  "parameters": parameters, "dtype": "float32"})


def coefficients_from_recipe(recipe: Recipe, base: str | Path, sources: list[str], merge: FunctionalMerge
                             ) -> torch.Tensor:
    """Initial coefficients from a parameter-space recipe: each group's mean weight per source.

    The recipe must merge the same base and sources with per-source ``weight``
    parameters (task_arithmetic, ties, dare_*), as evolved parameter-space
    recipes do.
    """
    from evomerge.materialize.plan import open_models, plan_merge

    if recipe.slices is not None or recipe.models is None:
        raise EvomergeError("adamerging --init: the recipe is a frankenmerge (slices); need a parameter-space recipe")
    if str(recipe.base_model) != str(base):
        raise EvomergeError(f"adamerging --init: the recipe's base_model is {recipe.base_model}, not {base}")
    named = [str(m.model) for m in recipe.models]
    if sorted(named) != sorted(map(str, sources)):
        raise EvomergeError(f"adamerging --init: the recipe merges {named}, the tasks' models are {list(sources)}")
    plan = plan_merge(recipe, open_models(recipe), where="--init recipe")
    sums = torch.zeros(len(sources), len(merge.groups))
    counts = torch.zeros(len(merge.groups))
    for job in plan.jobs:
        if job.out_name not in merge.group_of or "weight" not in job.kwargs:
            continue
        g = merge.group_of[job.out_name]
        by_model = {model: w for (model, _), w in zip(job.sources, job.kwargs["weight"])}
        for k, source in enumerate(sources):
            sums[k, g] += float(by_model[str(source)])
        counts[g] += 1
    if not bool((counts > 0).all()):
        raise EvomergeError(f"adamerging --init: the recipe's method {recipe.merge_method} has no per-source weights")
    return sums / counts


def entropy_of(merged_dir: str | Path, tasks: list[EntropyTask], device: str = "cpu") -> float:
    """Mean per-task entropy of a merged model directory on all the tasks' inputs (heads swapped in)."""
    model = load_model(merged_dir, device)
    own = dict(model.named_parameters())
    total = 0.0
    with torch.no_grad():
        saved = {k: own[k].detach().clone() for t in tasks for k in t.head}
        for task in tasks:
            for name, tensor in task.head.items():
                own[name].copy_(tensor)
            out = model(**{k: v.to(device) for k, v in task.inputs.items()})
            total += float(prediction_entropy(out.logits))
            for name, tensor in saved.items():
                own[name].copy_(tensor)
    return total / len(tasks)


def text_tasks(path: str | Path, sources: dict[str, str], tokenizer, *, field: str = "prompt",
               group_field: str = "task", limit: int | None = None) -> list[EntropyTask]:
    """Entropy tasks from a JSONL file of unlabeled prompts, one per value of ``group_field``.

    ``sources`` maps each group value (e.g. the zoo's task names) to its
    fine-tuned model; every group must have prompts. Prompts are tokenized once,
    left-padded, so the last position is every prompt's next-token prediction.
    """
    from evomerge.evaluation.base import read_jsonl_rows, tokenize_batches

    rows = read_jsonl_rows(path, (field, group_field))
    tasks = []
    for name, source in sources.items():
        prompts = [str(r[field]) for r in rows if r[group_field] == name][:limit]
        if not prompts:
            raise EvomergeError(f"{path}: no unlabeled prompts with {group_field} = {name!r}")
        (batch,) = tokenize_batches(tokenizer, prompts, len(prompts), "left")
        tasks.append(EntropyTask(name, str(source), dict(batch)))
    return tasks

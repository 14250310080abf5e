"""AdaMerging: merge coefficients learned by minimising prediction entropy on unlabeled inputs.

Yang et al. (ICLR 2024) merge task vectors ``tau_k = theta_k - theta_base`` as
``theta = theta_base + sum_k lambda_k tau_k`` and learn the ``lambda`` by Adam on
the Shannon entropy of the merged model's predictions, summed over tasks, on
unlabeled inputs of each task. No labels are used.

Granularities, the ++ variant and the exported recipe: see
:mod:`evomerge.adamerging.merge`.

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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.adamerging.merge import FunctionalMerge, coefficients_from_recipe, recipe_for
from evomerge.errors import EvomergeError
from evomerge.evaluation.entropy import prediction_entropy
from evomerge.io.live import checkpoint_names, checkpoint_parameters, load_model
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)


class AdaMergingSettings(BaseModel):
    """Training settings; defaults follow the reference code (Adam 1e-3, init 0.3, 500 steps, batch 16, clamp)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    granularity: Literal["task", "layer", "tensor"] = "layer"
    plus_plus: bool = False
    density: float = Field(0.2, gt=0, le=1)
    #: bounded: coefficients live near [0, 1], and Adam's step overflows float32 for an lr near 1e38
    lr: float = Field(1e-3, gt=0, le=1e3)
    init: float = Field(0.3, ge=-1e3, le=1e3)
    steps: int = Field(500, ge=0)
    batch_size: int = Field(16, ge=1)
    clamp: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _init_trains(self) -> AdaMergingSettings:
        if self.clamp and not 0 <= self.init <= 1:
            raise ValueError(f"init {self.init} is outside [0, 1]: clamped there, no coefficient would move "
                             "(the clamp passes no gradient); pick an init in [0, 1] or set clamp: false")
        return self


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


def adamerge(base: str | Path, tasks: list[EntropyTask], settings: AdaMergingSettings | None = None, *,
             init: torch.Tensor | Recipe | None = None, device: str | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``tasks`` (one fine-tuned source each) on top of ``base``.

    ``init`` overrides the constant ``settings.init``: coefficients
    (``[tasks, groups]``) or a parameter-space recipe of the same models, whose
    per-group mean weights are the start (refining an evolved recipe).
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
    live_names = checkpoint_names(model)
    heads = _check_heads(tasks, model, live_names)
    merge = FunctionalMerge(base, [t.source for t in tasks], granularity=settings.granularity,
                            plus_plus=settings.plus_plus, density=settings.density, exclude=heads, device=device)
    shape = (len(tasks), len(merge.groups))
    if isinstance(init, Recipe):
        init = coefficients_from_recipe(init, base, [t.source for t in tasks], merge)
    if init is None:
        raw = torch.full(shape, float(settings.init), device=device)
    elif tuple(init.shape) != shape:
        raise EvomergeError(f"adamerging: init coefficients have shape {list(init.shape)}, expected {list(shape)}")
    else:
        raw = init.detach().to(device=device, dtype=torch.float32).clone()
        if settings.clamp and not bool(((raw >= 0) & (raw <= 1)).all()):
            log.warning("adamerging: %d starting coefficients lie outside [0, 1]; clamped there, they will not "
                        "train (set clamp: false to let them)", int(((raw < 0) | (raw > 1)).sum()))
    raw.requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    task_heads = [{live_names[k]: v.to(device) for k, v in t.head.items()} for t in tasks]

    def coefficients() -> torch.Tensor:
        return raw.clamp(0, 1) if settings.clamp else raw

    def loss_on(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        merged = {live_names[k]: v for k, v in merge.tensors(coefficients()).items()}
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
        try:
            initial = float(loss_on(probe)) / len(tasks)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # inputs of the wrong shape or kind
            raise EvomergeError(f"adamerging: the model cannot run on the tasks' unlabeled inputs "
                                f"({type(exc).__name__}: {exc})") from None
    losses: list[float] = []
    stopped = None
    for step in range(settings.steps):
        loss = loss_on(sample())
        last_good = raw.detach().clone()
        if torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        # a non-finite loss, or an update that made a coefficient non-finite, ends training at the last good step
        if not torch.isfinite(loss) or not torch.isfinite(raw).all():
            with torch.no_grad():
                raw.copy_(last_good)
            what = f"loss became {loss.item()}" if not torch.isfinite(loss) else "a coefficient became non-finite"
            stopped = f"{what} at step {step + 1}; kept the coefficients of step {step}"
            log.warning("adamerging: %s", stopped)
            break
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
    with torch.no_grad():
        learned = coefficients().detach().cpu()
        final = float(loss_on(probe)) / len(tasks)
    sources = [t.source for t in tasks]
    recipe = recipe_for(merge, base, sources, learned, heads=sorted(heads))
    return AdaMergingResult(learned, merge.groups, sources, losses, initial, final, stopped, recipe)


def _check_heads(tasks: list[EntropyTask], model, live_names: dict[str, str]) -> set[str]:
    """Head tensor names (all tasks must name the same ones) checked against the live model."""
    names = set(tasks[0].head)
    own = checkpoint_parameters(model, live_names)
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

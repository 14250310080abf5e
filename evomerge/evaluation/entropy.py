"""AdaMerging's surrogate: mean predictive entropy on unlabeled inputs (lower is better)."""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import (
    Evaluator,
    HeadSwap,
    check_counts,
    check_image_model,
    image_batches,
    per_batch,
    read_jsonl,
    read_npz,
    tokenize_batches,
)
from evomerge.evaluation.registry import register


def prediction_entropy(logits):
    """Mean Shannon entropy (nats) of the predicted distributions; sequence logits use their last position."""
    import torch

    if logits.dim() == 3:
        logits = logits[:, -1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@register
class EntropyEvaluator(Evaluator):
    """Mean Shannon entropy (nats) of the model's predictions on unlabeled inputs.

    Needs no labels: a merge that is confident on its tasks' inputs scores low.
    ``path`` is a JSONL file of prompts (``field``; the zoo's
    ``unlabeled.jsonl``; scored on the next token after each prompt) or an
    ``.npz`` file of images (``pixel_values``; class predictions). Inputs are
    prepared once, at setup. ``head_from``/``head_prefix``: as for
    ``accuracy``, the task's own head is put in before each evaluation.
    """

    name = "entropy"
    fixed_metrics = ("entropy",)

    def __init__(self, path: str, field: str = "prompt", limit: int | None = None, batch_size: int = 64,
                 head_from: str | None = None, head_prefix: str = "classifier") -> None:
        check_counts("entropy", limit=(limit, 1), batch_size=(batch_size, 1))
        self.path = path
        self.field = field
        self.limit = limit
        self.batch_size = batch_size
        self.head = HeadSwap(head_from, head_prefix) if head_from else None
        self._batches = None

    def setup(self, model, tokenizer) -> None:
        if self.head is not None:
            self.head.setup(model)
        if str(self.path).endswith(".npz"):
            check_image_model("entropy", model, self.path)
            self._batches = image_batches(read_npz(self.path, ("pixel_values",), self.limit)["pixel_values"],
                                          self.batch_size)
        else:
            prompts = read_jsonl(self.path, self.field, self.limit)
            empty = next((i for i, p in enumerate(prompts) if not p), None)
            if empty is not None:  # nothing to predict after: the score would be the padding's
                raise EvomergeError(f"entropy: {self.path}: row {empty + 1} has an empty {self.field!r}")
            # left padding: the last position is every prompt's last token
            self._batches = tokenize_batches(tokenizer, prompts, self.batch_size, "left")

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        if self._batches is None:
            self.setup(model, tokenizer)
        if self.head is not None:
            self.head.apply(model)
        # a batch's mean entropy, weighted by its rows: the last batch may be short
        parts = per_batch(model, self._batches, lambda logits: (float(prediction_entropy(logits)), logits.shape[0]))
        return {"entropy": sum(mean * rows for mean, rows in parts) / sum(rows for _, rows in parts)}


@register
class MultiHeadEntropyEvaluator(Evaluator):
    """Mean entropy over several tasks' unlabeled images, in one forward pass, each task through its own head.

    The multi-head setting's surrogate at the cost of a single pass: every
    task's images (``paths``, ``.npz`` with ``pixel_values``) go through the
    model together; the input of the linear head module (``head_prefix``) is
    captured and each task's rows are scored with that task's head tensors
    (from ``heads_from``, the task models). Reports ``entropy``, the mean over
    tasks of each task's mean entropy: the same number as one ``entropy``
    evaluator per task with ``head_from``, averaged.
    """

    name = "multihead_entropy"
    fixed_metrics = ("entropy",)

    def __init__(self, paths: list[str], heads_from: list[str], head_prefix: str = "classifier",
                 limit: int | None = None) -> None:
        if not paths or len(paths) != len(heads_from):
            raise EvomergeError("multihead_entropy: give one heads_from model per path (and at least one)")
        check_counts("multihead_entropy", limit=(limit, 1))
        self.paths = list(paths)
        self.heads = [HeadSwap(d, head_prefix) for d in heads_from]
        self.head_prefix = head_prefix
        self.limit = limit
        self._images = None
        self._bounds: list[int] = []

    def setup(self, model, tokenizer) -> None:
        import numpy as np
        import torch

        module = dict(model.named_modules()).get(self.head_prefix)
        if not isinstance(module, torch.nn.Linear):
            raise EvomergeError(f"multihead_entropy: {type(model).__name__} has no linear head {self.head_prefix!r}")
        for head in self.heads:
            head.setup(model)
        arrays = [read_npz(p, ("pixel_values",), self.limit)["pixel_values"] for p in self.paths]
        self._bounds = np.cumsum([0, *map(len, arrays)]).tolist()
        self._images = torch.from_numpy(np.concatenate(arrays)).float()
        self._weights = [(h.tensors[f"{self.head_prefix}.weight"], h.tensors.get(f"{self.head_prefix}.bias"))
                         for h in self.heads]

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import torch

        if self._images is None:
            self.setup(model, tokenizer)
        device = next(model.parameters()).device
        captured = []
        hook = model.get_submodule(self.head_prefix).register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0]))
        try:
            with torch.no_grad():
                model(pixel_values=self._images.to(device))
        finally:
            hook.remove()
        features = captured[0]
        total = 0.0
        with torch.no_grad():
            for (weight, bias), start, end in zip(self._weights, self._bounds, self._bounds[1:]):
                logits = torch.nn.functional.linear(features[start:end], weight.to(device),
                                                    None if bias is None else bias.to(device))
                total += float(prediction_entropy(logits))
        return {"entropy": total / len(self._weights)}

"""AdaMerging's surrogate: mean predictive entropy on unlabeled inputs (lower is better)."""

from __future__ import annotations

from evomerge.evaluation.base import Evaluator, HeadSwap, image_batches, read_jsonl, read_npz, tokenize_batches
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

    def __init__(self, path: str, field: str = "prompt", limit: int | None = None, batch_size: int = 64,
                 head_from: str | None = None, head_prefix: str = "classifier") -> None:
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
            self._batches = image_batches(read_npz(self.path, ("pixel_values",), self.limit)["pixel_values"],
                                          self.batch_size)
        else:
            prompts = read_jsonl(self.path, self.field, self.limit)
            # left padding: the last position is every prompt's last token
            self._batches = tokenize_batches(tokenizer, prompts, self.batch_size, "left")

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import torch

        if self._batches is None:
            self.setup(model, tokenizer)
        if self.head is not None:
            self.head.apply(model)
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self._batches:
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                total += float(prediction_entropy(logits)) * logits.shape[0]
                count += logits.shape[0]
        return {"entropy": total / count}

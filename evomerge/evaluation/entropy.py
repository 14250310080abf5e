"""AdaMerging's surrogate: mean predictive entropy on unlabeled prompts (lower is better)."""

from __future__ import annotations

from evomerge.evaluation.base import Evaluator, read_jsonl, tokenize_batches
from evomerge.evaluation.registry import register


@register
class EntropyEvaluator(Evaluator):
    """Mean Shannon entropy (nats) of the next-token distribution after each prompt.

    Needs no labels: a merge that is confident on its tasks' inputs scores low.
    Prompts come from a JSONL file's ``field`` (the zoo's ``unlabeled.jsonl``);
    they are tokenized once, at setup.
    """

    name = "entropy"

    def __init__(self, path: str, field: str = "prompt", limit: int | None = None, batch_size: int = 64) -> None:
        self.path = path
        self.field = field
        self.limit = limit
        self.batch_size = batch_size
        self._batches = None

    def setup(self, model, tokenizer) -> None:
        prompts = read_jsonl(self.path, self.field, self.limit)
        # left padding: the last position is every prompt's last token
        self._batches = tokenize_batches(tokenizer, prompts, self.batch_size, "left")

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import torch

        if self._batches is None:
            self.setup(model, tokenizer)
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self._batches:
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, -1, :].float()
                logp = torch.log_softmax(logits, dim=-1)
                total += float(-(logp.exp() * logp).sum(-1).sum())
                count += logits.shape[0]
        return {"entropy": total / count}

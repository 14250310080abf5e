"""Perplexity of the live model on a JSONL text file."""

from __future__ import annotations

import math

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import Evaluator, check_counts, read_jsonl, tokenize_batches
from evomerge.evaluation.registry import register


@register
class PerplexityEvaluator(Evaluator):
    """exp(mean token negative log-likelihood) over the texts of a JSONL file (lower is better)."""

    name = "perplexity"
    fixed_metrics = ("perplexity", "nll")

    def __init__(self, path: str, field: str = "text", limit: int | None = None, batch_size: int = 32,
                 max_length: int = 1024) -> None:
        # a token is scored from the ones before it: a text needs two
        check_counts("perplexity", limit=(limit, 1), batch_size=(batch_size, 1), max_length=(max_length, 2))
        self.path = path
        self.field = field
        self.limit = limit
        self.batch_size = batch_size
        self.max_length = max_length
        self._batches = None

    def setup(self, model, tokenizer) -> None:
        # empty texts score nothing; a batch of only empty ones would have no positions at all
        texts = [t for t in read_jsonl(self.path, self.field, self.limit) if t]
        self._batches = tokenize_batches(tokenizer, texts, self.batch_size, "right", truncation=True,
                                         max_length=self.max_length)
        if not sum(int(b["attention_mask"][:, 1:].sum()) for b in self._batches):
            raise EvomergeError(f"perplexity: {self.path}: no {self.field!r} text has two or more tokens; "
                                "nothing to score")

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import torch

        if self._batches is None:
            self.setup(model, tokenizer)
        device = next(model.parameters()).device
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for batch in self._batches:
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = ids[:, 1:]
                keep = mask[:, 1:].bool()
                losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                nll += float(losses[keep].sum())
                tokens += int(keep.sum())
        return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens}

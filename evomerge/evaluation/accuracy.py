"""Classification accuracy of a ``*ForSequenceClassification`` model on labelled JSONL."""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import Evaluator, read_jsonl_rows, tokenize_batches
from evomerge.evaluation.registry import register


@register
class AccuracyEvaluator(Evaluator):
    """Share of rows whose arg-max class equals the label.

    Rows come from a JSONL file: ``input_field`` (text) and ``label_field``,
    either a class index or a class name from the model's ``config.label2id``.
    Inputs are tokenized once, at setup; labels are checked against the model's
    number of classes there, so a wrong file fails before any candidate.
    """

    name = "accuracy"

    def __init__(self, path: str, input_field: str = "text", label_field: str = "label", limit: int | None = None,
                 batch_size: int = 32) -> None:
        self.path = path
        self.input_field = input_field
        self.label_field = label_field
        self.limit = limit
        self.batch_size = batch_size
        self._batches = None
        self._labels = None

    def setup(self, model, tokenizer) -> None:
        import torch

        rows = read_jsonl_rows(self.path, (self.input_field, self.label_field), self.limit)
        num_labels = int(getattr(model.config, "num_labels", 0))
        if not num_labels or not hasattr(model, "score") and not hasattr(model, "classifier"):
            raise EvomergeError(f"accuracy: {type(model).__name__} is not a classification model")
        names = getattr(model.config, "label2id", {}) or {}
        labels = []
        for number, row in enumerate(rows, 1):
            label = row[self.label_field]
            index = names.get(label) if isinstance(label, str) else label
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_labels:
                raise EvomergeError(
                    f"{self.path}: row {number}: label {label!r} is not a class of the model "
                    f"(0..{num_labels - 1}{' or ' + ', '.join(map(str, names)) if names else ''})"
                )
            labels.append(index)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the head needs it to find each row's end
        texts = [str(row[self.input_field]) for row in rows]
        # right padding with an attention mask: classification heads pick each row's last real token
        self._batches = tokenize_batches(tokenizer, texts, self.batch_size, "right")
        self._labels = torch.tensor(labels)

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import torch

        if self._batches is None:
            self.setup(model, tokenizer)
        device = next(model.parameters()).device
        predictions = []
        with torch.inference_mode():
            for batch in self._batches:
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                predictions.append(logits.argmax(-1).cpu())
        correct = (torch.cat(predictions) == self._labels).sum().item()
        return {"accuracy": correct / len(self._labels)}

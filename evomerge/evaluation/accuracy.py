"""Classification accuracy on labelled data: text (JSONL) or images (``.npz``)."""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import (
    Evaluator,
    HeadSwap,
    check_counts,
    check_image_model,
    image_batches,
    per_batch,
    read_jsonl_rows,
    read_npz,
    tokenize_batches,
)
from evomerge.evaluation.registry import register


@register
class AccuracyEvaluator(Evaluator):
    """Share of rows whose arg-max class equals the label.

    ``path`` is a JSONL file (``input_field`` text for a
    ``*ForSequenceClassification`` model; ``label_field`` a class index or a
    class name from ``config.label2id``) or an ``.npz`` file (``pixel_values``
    N x C x H x W and integer ``labels``, for an image classifier).
    ``head_from`` names a model directory whose head tensors (names starting
    with ``head_prefix``) replace the live model's before every evaluation: the
    multi-head setting, where a merged encoder is scored with each task's own
    head. Inputs are prepared once, at setup; labels are checked against the
    model's number of classes there, so a wrong file fails before any candidate.
    """

    name = "accuracy"
    fixed_metrics = ("accuracy",)

    def __init__(self, path: str, input_field: str = "text", label_field: str = "label", limit: int | None = None,
                 batch_size: int = 32, head_from: str | None = None, head_prefix: str = "classifier") -> None:
        check_counts("accuracy", limit=(limit, 1), batch_size=(batch_size, 1))
        self.path = path
        self.input_field = input_field
        self.label_field = label_field
        self.limit = limit
        self.batch_size = batch_size
        self.head = HeadSwap(head_from, head_prefix) if head_from else None
        self._batches = None
        self._labels = None

    def setup(self, model, tokenizer) -> None:
        import torch

        num_labels = int(getattr(model.config, "num_labels", 0))
        if not num_labels or not hasattr(model, "score") and not hasattr(model, "classifier"):
            raise EvomergeError(f"accuracy: {type(model).__name__} is not a classification model")
        if self.head is not None:
            self.head.setup(model)
        if str(self.path).endswith(".npz"):
            check_image_model("accuracy", model, self.path)
            arrays = read_npz(self.path, ("pixel_values", "labels"), self.limit)
            raw = arrays["labels"].tolist()
            # 3.0 is class 3; 3.5 is no class (not truncated to one)
            labels = [int(v) if isinstance(v, float) and v.is_integer() else v for v in raw]
            self._check_labels(labels, num_labels, {}, raw=raw)
            self._batches = image_batches(arrays["pixel_values"], self.batch_size)
        else:
            rows = read_jsonl_rows(self.path, (self.input_field, self.label_field), self.limit)
            names = getattr(model.config, "label2id", {}) or {}
            labels = [row[self.label_field] for row in rows]
            labels = self._check_labels([names.get(v, v) if isinstance(v, str) else v for v in labels], num_labels,
                                        names, raw=[row[self.label_field] for row in rows])
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = tokenizer.pad_token_id  # the head needs it to find each row's end
            texts = [str(row[self.input_field]) for row in rows]
            # right padding with an attention mask: classification heads pick each row's last real token
            self._batches = tokenize_batches(tokenizer, texts, self.batch_size, "right")
        self._labels = torch.tensor(labels)

    def _check_labels(self, labels: list, num_labels: int, names: dict, raw: list | None = None) -> list[int]:
        for number, (index, given) in enumerate(zip(labels, raw or labels), 1):
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_labels:
                raise EvomergeError(
                    f"{self.path}: row {number}: label {given!r} is not a class of the model "
                    f"(0..{num_labels - 1}{' or ' + ', '.join(map(str, names)) if names else ''})"
                )
        return labels

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import torch

        if self._batches is None:
            self.setup(model, tokenizer)
        if self.head is not None:
            self.head.apply(model)
        predictions = per_batch(model, self._batches, lambda logits: logits.argmax(-1).cpu())
        correct = (torch.cat(predictions) == self._labels).sum().item()
        return {"accuracy": correct / len(self._labels)}

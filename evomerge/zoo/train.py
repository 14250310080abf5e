"""Tiny training and greedy-evaluation loops used to build the zoo.

Only the zoo build uses these; they are deliberately plain (AdamW, masked
next-token loss on the answer) and deterministic given the seed and the
thread count the build pins.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from evomerge.zoo.tasks import EOS, CharTask

Example = tuple[str, str]


class CharCodec:
    """Fast string <-> id mapping that agrees with the zoo's character tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.inv = {i: t for t, i in self.vocab.items()}
        self.pad_id: int = tokenizer.pad_token_id
        self.eos_id: int = self.vocab[EOS]

    def encode(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.inv[i] for i in ids)


def make_batch(codec: CharCodec, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded inputs with the loss restricted to the answer and its newline."""
    seqs, labels = [], []
    for prompt, answer in examples:
        p, a = codec.encode(prompt), codec.encode(answer + EOS)
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), codec.pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class MixtureSampler:
    """Draws training batches from a weighted mixture of tasks.

    Prompts in ``exclude`` (the held-out evaluation items) are never trained on.
    ``weights`` may be changed between batches, e.g. to stop pushing a task
    the model already does well enough.
    """

    def __init__(self, tasks: Sequence[CharTask], rng: random.Random, exclude: set[str],
                 weights: Sequence[float] | None = None) -> None:
        self.tasks = list(tasks)
        self.rng = rng
        self.exclude = exclude
        self.weights = list(weights) if weights is not None else [1.0] * len(self.tasks)

    def __call__(self, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            task = self.rng.choices(self.tasks, weights=self.weights)[0]
            ex = task.sample(self.rng)
            if ex[0] not in self.exclude:
                out.append(ex)
        return out


def train(
    model,
    codec: CharCodec,
    draw: Callable[[int], list[Example]],
    *,
    max_steps: int,
    lr: float,
    batch_size: int,
    warmup: int = 0,
    weight_decay: float = 0.0,
    check_every: int = 0,
    should_stop: Callable[[int], bool] | None = None,
) -> int:
    """Train ``model`` with AdamW (linear warm-up, then constant ``lr``).

    Every ``check_every`` steps ``should_stop(step)`` is asked whether the model
    has reached the wanted competence, so training stops at a skill level rather
    than at a step count that would depend on the machine's numerics.
    Returns the number of steps taken.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    step = 0
    while step < max_steps:
        batch = make_batch(codec, draw(batch_size))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if check_every and should_stop is not None and step % check_every == 0:
            stop = should_stop(step)
            model.train()
            if stop:
                break
    model.eval()
    return step


@torch.no_grad()
def greedy_answers(
    model, codec: CharCodec, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy-decode each prompt until a newline (or ``max_new_tokens``); answers without it."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [codec.encode(p) for p in prompts[start : start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), codec.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=codec.eos_id,
            pad_token_id=codec.pad_id,
        )
        for row in out[:, width:].tolist():
            text = codec.decode([t for t in row if t != codec.pad_id])
            answers.append(text.split(EOS, 1)[0])
    return answers


def exact_match(model, codec: CharCodec, rows: Sequence[Example], max_new_tokens: int) -> float:
    """Fraction of ``rows`` whose greedy answer equals the reference exactly."""
    got = greedy_answers(model, codec, [p for p, _ in rows], max_new_tokens)
    return sum(g == a for g, (_, a) in zip(got, rows)) / len(rows)

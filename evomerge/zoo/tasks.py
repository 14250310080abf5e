"""Character-level tasks the LM zoo is trained and evaluated on.

Every example is a prompt such as ``"rev:abc="`` and an answer such as ``"cba"``;
the model must generate the answer followed by a newline. Each task samples from
a fixed distribution set by its length range, and the same distribution is used
for pre-training the base, for the fine-tune, and for the evaluation splits, so
a fine-tune *sharpens* a skill the base partly has (the regime where merging
helps real LLMs) rather than creating a new one.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits
#: Every character a prompt or answer can contain, in vocabulary order.
ALPHABET = DIGITS + LETTERS + "+=:\n"
EOS = "\n"


@dataclass(frozen=True)
class CharTask:
    """A generator of (prompt, answer) pairs over one fixed distribution."""

    name: str
    min_len: int
    max_len: int
    make: Callable[[random.Random, int], tuple[str, str]]
    description: str

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """Draw one (prompt, answer) pair; the answer has no trailing newline."""
        return self.make(rng, rng.randint(self.min_len, self.max_len))


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _add(rng: random.Random, n: int) -> tuple[str, str]:
    a = rng.randint(0, 10**n - 1)
    b = rng.randint(0, 10**n - 1)
    return f"{a}+{b}=", str(a + b)


def _rev(rng: random.Random, n: int) -> tuple[str, str]:
    w = _word(rng, n)
    return f"rev:{w}=", w[::-1]


def _sort(rng: random.Random, n: int) -> tuple[str, str]:
    w = _word(rng, n)
    return f"sort:{w}=", "".join(sorted(w))


def _copy(rng: random.Random, n: int) -> tuple[str, str]:
    w = _word(rng, n)
    return f"copy:{w}=", w


def _shift(rng: random.Random, n: int) -> tuple[str, str]:
    w = _word(rng, n)
    return f"shift:{w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _count(rng: random.Random, n: int) -> tuple[str, str]:
    w = _word(rng, n)
    return f"len:{w}=", str(n)


_MAKERS: dict[str, tuple[Callable[[random.Random, int], tuple[str, str]], str]] = {
    "add": (_add, "decimal addition of two numbers"),
    "rev": (_rev, "reverse a lowercase string"),
    "sort": (_sort, "sort the letters of a lowercase string"),
    "shift": (_shift, "replace each letter by the next one in the alphabet"),
    "copy": (_copy, "repeat a lowercase string"),
    "len": (_count, "length of a lowercase string"),
}


def make_task(name: str, min_len: int, max_len: int) -> CharTask:
    """Build the task ``name`` over inputs of ``min_len``..``max_len`` characters/digits."""
    make, description = _MAKERS[name]
    return CharTask(name, min_len, max_len, make, description)


def heldout_split(
    task: CharTask, seed: int, sizes: dict[str, int], exclude: set[str] | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Draw disjoint splits (distinct prompts) of ``task``, e.g. validation/test/unlabeled."""
    rng = random.Random(f"{seed}:{task.name}:heldout")
    seen = set(exclude or ())
    out: dict[str, list[tuple[str, str]]] = {}
    for split, n in sizes.items():
        rows: list[tuple[str, str]] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"task {task.name}: input space too small for {n} distinct items")
            prompt, answer = task.sample(rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append((prompt, answer))
        out[split] = rows
    return out

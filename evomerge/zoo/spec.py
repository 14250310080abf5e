"""Zoo recipes: model shape, task mixture and training schedule per size.

A spec plus a seed determines a zoo; their hash names it on disk, so a build
with the same spec is skipped and a changed recipe never reuses stale models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


def fingerprint(payload: dict) -> str:
    """Stable short hash of a zoo's spec and seed (names its directory)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


#: Bumped whenever the build procedure changes what a spec produces.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    """One task of the mixture; ``finetune`` tasks get their own fine-tuned model."""

    name: str
    min_len: int
    max_len: int
    finetune: bool = True
    mix_weight: float = 1.0


@dataclass(frozen=True)
class LMZooSpec:
    """Everything that determines an LM zoo besides the seed."""

    size: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    tasks: tuple[TaskSpec, ...]
    # Base pre-training keeps every fine-tune task inside a competence band: a task
    # whose validation exact match passes `competence_cap` drops to `capped_weight` in
    # the mixture, and training stops once every task reaches `competence` (checked
    # every `check_every` steps) or at `base_max_steps`. Fine-tunes then sharpen a
    # skill the base partly has, the regime where merging helps.
    base_lr: float = 3e-3
    base_batch: int = 64
    base_warmup: int = 50
    base_max_steps: int = 1500
    competence: float | None = None
    competence_cap: float = 1.0
    capped_weight: float = 0.2
    check_every: int = 50
    # Fine-tunes: short, small learning rate, own task only -> small task vectors.
    ft_lr: float = 3e-4
    ft_steps: int = 300
    ft_batch: int = 64
    # Without training (benchmark-only zoos) fine-tunes are the base plus noise.
    trained: bool = True
    perturb_std: float = 0.0
    n_validation: int = 200
    n_test: int = 200
    n_unlabeled: int = 200
    max_gen_toks: int = 12
    dtype: str = "float32"
    max_shard_size: str = "1MB"
    threads: int = 2
    format_version: int = FORMAT_VERSION

    @property
    def finetune_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if t.finetune]

    def fingerprint(self, seed: int) -> str:
        """Stable short hash of the spec and seed."""
        return fingerprint({"spec": asdict(self), "seed": seed})


LM_SIZES: dict[str, LMZooSpec] = {
    # Mechanics only: builds in seconds; easy tasks so a few steps give some skill.
    "tiny": LMZooSpec(
        size="tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        tasks=(
            TaskSpec("copy", 1, 3),
            TaskSpec("rev", 1, 3),
            TaskSpec("sort", 1, 3),
        ),
        base_max_steps=120,
        ft_steps=30,
        ft_lr=1e-3,
        n_validation=32,
        n_test=32,
        n_unlabeled=32,
        max_gen_toks=6,
        max_shard_size="100KB",
    ),
    "small": LMZooSpec(
        size="small",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=352,
        tasks=(
            TaskSpec("shift", 4, 8),
            TaskSpec("rev", 5, 9),
            TaskSpec("sort", 4, 8),
            TaskSpec("copy", 2, 8, finetune=False),
            TaskSpec("len", 1, 9, finetune=False),
        ),
        competence=0.3,
        competence_cap=0.55,
        base_max_steps=2000,
        ft_steps=300,
    ),
    # Benchmarks only (~250M parameters in bf16): untrained, fine-tunes are perturbations.
    "medium": LMZooSpec(
        size="medium",
        hidden_size=1024,
        num_layers=20,
        num_heads=16,
        intermediate_size=2816,
        tasks=(
            TaskSpec("shift", 4, 8),
            TaskSpec("rev", 5, 9),
            TaskSpec("sort", 4, 8),
        ),
        trained=False,
        perturb_std=1e-3,
        dtype="bfloat16",
        max_shard_size="200MB",
    ),
}


@dataclass(frozen=True)
class VisionZooSpec:
    """Everything that determines a vision zoo besides the seed.

    A small ViT on 8x8 digit images is pre-trained once (masked-patch
    reconstruction plus a little supervision) and fine-tuned, encoder only, on
    each task; every task keeps a fixed CLIP-like head (see ``zoo.vision``).
    """

    size: str
    tasks: tuple[str, ...]
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int = 2
    # pre-training: masked-patch reconstruction on every task's training images,
    # plus cross-entropy on `labels_per_task` labelled images of each task
    pre_steps: int = 1000
    pre_lr: float = 1e-3
    pre_weight_decay: float = 0.05
    pre_batch: int = 128
    mask_ratio: float = 0.5
    labels_per_task: int = 100
    # fine-tunes: encoder only, against the task's fixed head
    ft_steps: int = 300
    ft_lr: float = 1e-4
    ft_batch: int = 64
    # task heads, fixed: class directions blending each class's mean pre-trained feature
    # (weight head_alignment) with random orthonormal directions (1 - head_alignment); see zoo.vision
    head_alignment: float = 1.0
    head_scale: float = 10.0
    n_train: int = 1000
    n_validation: int = 200
    n_test: int = 397
    n_unlabeled: int = 200
    noise_std: float = 0.35
    max_shard_size: str = "1MB"
    threads: int = 2
    format_version: int = FORMAT_VERSION

    @property
    def finetune_tasks(self) -> list[str]:
        return list(self.tasks)

    def fingerprint(self, seed: int) -> str:
        """Stable short hash of the spec and seed."""
        return fingerprint({"kind": "vision", "spec": asdict(self), "seed": seed})


VISION_SIZES: dict[str, VisionZooSpec] = {
    # Mechanics only (tests): builds in seconds.
    "tiny": VisionZooSpec(
        size="tiny", tasks=("digits", "rotated", "inverted", "noisy"), hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, pre_steps=150, ft_steps=60, ft_lr=1e-3, n_train=400, n_validation=100, n_test=200,
        n_unlabeled=100, max_shard_size="100KB",
    ),
    "small": VisionZooSpec(
        size="small", tasks=("digits", "rotated", "inverted", "noisy", "rolled"), hidden_size=64, num_layers=4,
        num_heads=4, intermediate_size=128, head_alignment=0.25, ft_lr=3e-4,
    ),
}

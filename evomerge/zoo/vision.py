"""Build the vision zoo: a small ViT and encoder-only fine-tunes on digit-image tasks, for AdaMerging.

Data ships with scikit-learn (``load_digits``: 1797 8x8 images, 10 classes);
each task is a fixed transformation of them (``TRANSFORMS``) with the same ten
labels, split into train / validation / test / unlabeled per task.

The setting follows the AdaMerging paper's: one shared encoder is merged and
each task keeps its own fixed head. A head is CLIP-like: scale x cosine
similarity between the image feature and a direction per class. It is exact in
a stock ``ViTForImageClassification`` (no custom code): the final layer norm's
affine is frozen at identity, so the feature it outputs has zero mean and unit
variance, i.e. L2 norm sqrt(hidden) (up to the norm's eps), and a bias-free
linear classifier whose rows are ``scale / sqrt(hidden) * d_c`` (unit ``d_c``)
gives ``scale * cos``. Heads stay fixed while fine-tuning, so a fine-tune must
move features toward its task's class directions, and merged encoders are
scored with each task's head swapped in.

The class directions blend each class's mean *pre-trained* feature (weight
``head_alignment``) with random orthonormal directions, like CLIP's text
embeddings: related to the image encoder's features (zero-shot accuracy well
above chance) without being built from them. What moved the merges (docs/zoo.md):
heads trained per fine-tune made every merge worse than the pre-trained
encoder; pure class-mean heads (alignment 1) make the pre-trained encoder the
entropy minimum, so AdaMerging shrinks toward it; pure random heads (0) put it
at chance and entropy keeps falling past the useful task-vector scale; 0.25
(the small zoo) reproduces the paper's ordering with entropy a good ranker.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.zoo.registry import ZooInfo
from evomerge.zoo.spec import VISION_SIZES, VisionZooSpec

SPLITS = ("train", "validation", "test", "unlabeled")
#: Tensor-name prefix of a task model's head (kept per task, never merged).
HEAD_PREFIX = "classifier"
DATA_DIR = "data"


def _rotated(x, rng, spec):
    return np.rot90(x, 1, axes=(2, 3)).copy()


def _inverted(x, rng, spec):
    return 1.0 - x


def _noisy(x, rng, spec):
    return np.clip(x + rng.normal(0.0, spec.noise_std, x.shape).astype(np.float32), 0.0, 1.0)


def _rolled(x, rng, spec):
    return np.roll(x, (4, 4), axis=(2, 3)).copy()  # quadrants swapped diagonally


#: Task name -> transformation of the [0, 1] digit images (N x 1 x 8 x 8).
TRANSFORMS: dict[str, Callable] = {
    "digits": lambda x, rng, spec: x,
    "rotated": _rotated,
    "inverted": _inverted,
    "noisy": _noisy,
    "rolled": _rolled,
}


def get_vision_spec(size: str) -> VisionZooSpec:
    """The recipe for vision zoo ``size``, or a clear error naming the known sizes."""
    try:
        return VISION_SIZES[size]
    except KeyError:
        raise EvomergeError(f"unknown vision zoo size {size!r}; choose one of: {', '.join(VISION_SIZES)}") from None


def make_splits(spec: VisionZooSpec, seed: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per task and split: (images N x 1 x 8 x 8 float32 in [0, 1], labels int64); disjoint images per split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(images))
    images = (images[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = labels[order].astype(np.int64)
    sizes = [spec.n_train, spec.n_validation, spec.n_test, spec.n_unlabeled]
    if sum(sizes) > len(images):
        raise EvomergeError(f"vision zoo {spec.size}: splits need {sum(sizes)} images, digits has {len(images)}")
    bounds = np.cumsum([0, *sizes])
    out = {}
    for i, task in enumerate(spec.tasks):
        x = TRANSFORMS[task](images, np.random.default_rng([seed, i]), spec).astype(np.float32)
        out[task] = {s: (x[bounds[j]:bounds[j + 1]], labels[bounds[j]:bounds[j + 1]]) for j, s in enumerate(SPLITS)}
    return out


def _vit_config(spec: VisionZooSpec):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8, patch_size=spec.patch_size, num_channels=1, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )


def _patches(x, p: int):
    """Images -> (batch, patches, p*p) in the ViT's patch order (row-major)."""
    b, c, h, w = x.shape
    return x.unfold(2, p, p).unfold(3, p, p).reshape(b, (h // p) * (w // p), c * p * p)


def _unpatch(patches, shape, p: int):
    b, c, h, w = shape
    return patches.reshape(b, h // p, w // p, p, p).permute(0, 1, 3, 2, 4).reshape(b, c, h, w)


def _freeze_final_norm(model) -> None:
    import torch

    norm = model.vit.layernorm
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    norm.weight.requires_grad_(False)
    norm.bias.requires_grad_(False)


def _pretrain(model, spec: VisionZooSpec, splits, generator) -> None:
    """Masked-patch reconstruction on all tasks' training images plus a little supervision."""
    import torch
    import torch.nn.functional as F

    p, hidden = spec.patch_size, spec.hidden_size
    decoder = torch.nn.Linear(hidden, p * p)
    probe = torch.nn.Linear(hidden, 10)
    params = [q for q in model.parameters() if q.requires_grad] + [*decoder.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec.pre_lr, weight_decay=spec.pre_weight_decay)
    images = torch.cat([torch.from_numpy(splits[t]["train"][0]) for t in spec.tasks])
    labelled_x = torch.cat([torch.from_numpy(splits[t]["train"][0][: spec.labels_per_task]) for t in spec.tasks])
    labelled_y = torch.cat([torch.from_numpy(splits[t]["train"][1][: spec.labels_per_task]) for t in spec.tasks])
    model.train()
    for _ in range(spec.pre_steps):
        x = images[torch.randint(0, len(images), (spec.pre_batch,), generator=generator)]
        target = _patches(x, p)
        mask = torch.rand(target.shape[:2], generator=generator) < spec.mask_ratio
        hidden_states = model.vit(pixel_values=_unpatch(target.masked_fill(mask[..., None], 0.0), x.shape, p))
        reconstruction = decoder(hidden_states.last_hidden_state[:, 1:])
        loss = ((reconstruction - target) ** 2)[mask].mean()
        j = torch.randint(0, len(labelled_x), (spec.pre_batch // 2,), generator=generator)
        features = model.vit(pixel_values=labelled_x[j]).last_hidden_state[:, 0]
        loss = loss + F.cross_entropy(probe(features), labelled_y[j])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def cosine_head(model, images: np.ndarray, labels: np.ndarray, scale: float):
    """Classifier rows giving ``scale * cos(feature, class mean feature)`` (see the module doc)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        features = model.vit(pixel_values=torch.from_numpy(images)).last_hidden_state[:, 0]
    labels_t = torch.from_numpy(labels)
    means = torch.stack([features[labels_t == c].mean(0) for c in range(10)])
    return scale / math.sqrt(features.shape[-1]) * F.normalize(means, dim=-1)


def task_head(model, train: tuple[np.ndarray, np.ndarray], spec: VisionZooSpec, generator):
    """A task's fixed head: ``scale * cos(feature, d_c)`` with class directions ``d_c`` blending the
    class means of the pre-trained features (``head_alignment``) with random orthonormal directions."""
    import torch
    import torch.nn.functional as F

    a = spec.head_alignment
    if a >= 1:
        return cosine_head(model, *train, spec.head_scale)
    hidden = spec.hidden_size
    q, _ = torch.linalg.qr(torch.randn(hidden, 10, generator=generator))
    directions = q.T
    if a > 0:
        aligned = cosine_head(model, *train, spec.head_scale) * math.sqrt(hidden) / spec.head_scale
        directions = F.normalize(a * aligned + (1 - a) * directions, dim=-1)
    return spec.head_scale / math.sqrt(hidden) * directions


def _set_head(model, weight) -> None:
    import torch

    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.zero_()


def _finetune(model, spec: VisionZooSpec, x: np.ndarray, y: np.ndarray, generator) -> None:
    import torch
    import torch.nn.functional as F

    params = [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith(HEAD_PREFIX)]
    optimizer = torch.optim.AdamW(params, lr=spec.ft_lr, weight_decay=0.0)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(spec.ft_steps):
        j = torch.randint(0, len(x_t), (spec.ft_batch,), generator=generator)
        loss = F.cross_entropy(model(pixel_values=x_t[j]).logits, y_t[j])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``images`` whose arg-max class is the label."""
    import torch

    with torch.no_grad():
        predicted = model(pixel_values=torch.from_numpy(images)).logits.argmax(-1).numpy()
    return float((predicted == labels).mean())


def build_vision_zoo(size: str, out: Path | None = None, *, seed: int = 0, force: bool = False,
                     progress: Callable[[str], None] | None = None) -> ZooInfo:
    """Build (or reuse) the vision zoo ``size`` for ``seed`` at ``out`` (atomically, like the LM zoo)."""
    from evomerge.zoo.lm import build_zoo_dir

    spec = get_vision_spec(size)
    return build_zoo_dir("vision", size, spec, out, seed=seed, force=force, progress=progress,
                         build=lambda tmp, final, say: _build_into(tmp, spec, seed, say))


def _build_into(tmp: Path, spec: VisionZooSpec, seed: int, say: Callable[[str], None]) -> dict:
    import torch
    from transformers import ViTForImageClassification

    splits = make_splits(spec, seed)
    for task, per_split in splits.items():
        (tmp / DATA_DIR / task).mkdir(parents=True)
        for split, (x, y) in per_split.items():
            arrays = {"pixel_values": x} if split == "unlabeled" else {"pixel_values": x, "labels": y}
            np.savez(tmp / DATA_DIR / task / f"{split}.npz", **arrays)
    generator = torch.Generator().manual_seed(seed)
    model = ViTForImageClassification(_vit_config(spec))
    _freeze_final_norm(model)
    say(f"pre-training the ViT encoder ({spec.pre_steps} steps, masked patches + {spec.labels_per_task} labels/task)")
    _pretrain(model, spec, splits, generator)
    heads = {t: task_head(model, splits[t]["train"], spec, generator) for t in spec.tasks}
    models = {"base": "base"}
    table: dict[str, dict[str, float]] = {"base": {}}
    for t in spec.tasks:
        _set_head(model, heads[t])
        table["base"][t] = accuracy(model, *splits[t]["test"])
    finetuned = {}
    for t in spec.tasks:
        say(f"fine-tuning the encoder on {t} ({spec.ft_steps} steps, lr {spec.ft_lr}, fixed head)")
        ft = copy.deepcopy(model)
        _set_head(ft, heads[t])
        _finetune(ft, spec, *splits[t]["train"], generator)
        table[t] = {t: accuracy(ft, *splits[t]["test"])}
        finetuned[t] = {k: v.detach().clone() for k, v in ft.state_dict().items()}
        ft.save_pretrained(str(tmp / t), max_shard_size=spec.max_shard_size)
        models[t] = t
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for label, lam in (("weight averaging", 1.0 / len(spec.tasks)), ("task_arithmetic(lambda=0.3)", 0.3)):
        merged = {k: base_sd[k] + lam * sum(finetuned[t][k] - base_sd[k] for t in spec.tasks) for k in base_sd}
        model.load_state_dict(merged)
        table[label] = {}
        for t in spec.tasks:
            _set_head(model, heads[t])
            table[label][t] = accuracy(model, *splits[t]["test"])
    model.load_state_dict(base_sd)
    _set_head(model, heads[spec.tasks[0]])  # the base carries the first task's head; every use swaps its own
    model.save_pretrained(str(tmp / "base"), max_shard_size=spec.max_shard_size)
    gains = {t: table[t][t] - table["base"][t] for t in spec.tasks}
    return {
        "models": models, "finetune_tasks": list(spec.tasks), "tasks_dir": DATA_DIR, "head_prefix": HEAD_PREFIX,
        "verification": {"split": "test", "table": table, "finetune_gain": gains,
                         "finetunes_ok": all(g > 0 for g in gains.values()),
                         "passed": all(g > 0 for g in gains.values())},
    }


def task_split(zoo: ZooInfo, task: str, split: str) -> Path:
    """Path of ``task``'s ``split`` (.npz with ``pixel_values`` and, except unlabeled, ``labels``)."""
    if task not in zoo.finetune_tasks:
        raise EvomergeError(f"{zoo.path}: no task {task!r}; tasks: {', '.join(zoo.finetune_tasks)}")
    if split not in SPLITS:
        raise EvomergeError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return zoo.tasks_dir / task / f"{split}.npz"

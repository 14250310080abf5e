"""Load a model directory as the live ``transformers`` model (and tokenizer) it describes."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError

#: Files whose presence means a directory carries a tokenizer (image models have none).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(path: str | Path, device: str = "cpu"):
    """The model class ``config.json``'s ``architectures`` names (causal LM, image classifier, ...).

    Only classes ``transformers`` itself provides are loaded: remote code is
    never run.
    """
    import transformers

    from evomerge.fsutil import read_json

    transformers.utils.logging.disable_progress_bar()
    config = read_json(Path(path) / "config.json", f"{path}: not a model directory (no config.json)")
    names = config.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise EvomergeError(f"{path}/config.json: architectures {names} names no transformers model class")
    return model_class.from_pretrained(str(path)).to(device).eval()


def load_tokenizer(path: str | Path):
    """The directory's tokenizer, or ``None`` when it has none (an image model)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).exists() for name in TOKENIZER_MARKERS):
        return None
    return AutoTokenizer.from_pretrained(str(path))


def checkpoint_names(model) -> dict[str, str]:
    """Checkpoint tensor name -> the live model's state-dict name.

    transformers 5 renames some families' weights on load (ViT's
    ``vit.encoder.layer.N.attention.attention.query`` lives as
    ``vit.layers.N.attention.q_proj``) and renames them back on save; merges
    work on checkpoint names, in-place writes need live ones. The map is read
    from transformers' own save-side conversion, fed one distinct scalar per
    live tensor. Checkpoints whose tensors are split or fused on load (not just
    renamed) cannot be written in place by name and are refused.
    """
    import torch

    live = list(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5 loads checkpoint names as they are
        return {n: n for n in live}
    try:
        saved = revert_weight_conversion(model, {n: torch.tensor([float(i)]) for i, n in enumerate(live)})
    except (IndexError, RuntimeError, ValueError) as exc:  # conversions that split or stack tensors (MoE experts)
        raise EvomergeError(
            f"{type(model).__name__}: its checkpoint tensors are split or stacked on load ({type(exc).__name__}: "
            f"{exc}); in-place candidates are not supported for this model family"
        ) from None
    out = {}
    for name, marker in saved.items():
        if marker.numel() != 1:
            raise EvomergeError(
                f"{type(model).__name__}: checkpoint tensor {name!r} is built from several live tensors on load; "
                "in-place candidates are not supported for this model family"
            )
        out[name] = live[int(marker.item())]
    return out


def checkpoint_parameters(model, names: dict[str, str] | None = None) -> dict:
    """The live model's parameters by checkpoint name (``names``: a ``checkpoint_names`` map already made)."""
    names = checkpoint_names(model) if names is None else names
    params = dict(model.named_parameters())
    return {name: params[live] for name, live in names.items() if live in params}


def share_flat_storage(params: list):
    """Make ``params`` consecutive views of one new flat buffer, values kept; the buffer, or ``None``.

    Writing a block of merged tensors into the buffer is then one copy instead
    of one per tensor. ``None`` (nothing changed) when the parameters differ in
    dtype or device or one of them appears twice (tied weights).
    """
    import torch

    if not params or len({id(p) for p in params}) != len(params) \
            or len({(p.dtype, p.device) for p in params}) != 1:
        return None
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    start = 0
    for p in params:
        view = flat[start:start + p.numel()].view(p.shape)
        view.copy_(p.data)
        p.data = view
        start += p.numel()
    return flat

"""Load a model directory as the live ``transformers`` model it describes."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError


def load_model(path: str | Path, device: str = "cpu"):
    """The HF model class named by ``config.json``'s ``architectures`` (no remote code)."""
    import transformers

    from evomerge.fsutil import read_json

    transformers.utils.logging.disable_progress_bar()

    config = read_json(Path(path) / "config.json", f"{path}: not a model directory (no config.json)")
    names = config.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise EvomergeError(f"{path}/config.json: architectures {names} names no transformers model class")
    return model_class.from_pretrained(str(path)).to(device).eval()

"""Locally built model families (no hub access) for demos, tests and benchmarks."""

from evomerge.zoo.registry import ZooInfo, cache_dir, default_zoo_dir, load_zoo

__all__ = ["ZooInfo", "build_zoo", "cache_dir", "default_zoo_dir", "load_zoo", "ZOO_KINDS"]

#: Zoo kinds `evomerge zoo build` knows, with their sizes.
ZOO_KINDS: dict[str, tuple[str, ...]] = {"lm": ("tiny", "small", "medium"), "vision": ("tiny", "small")}


def build_zoo(kind: str, size: str, out=None, *, seed: int = 0, force: bool = False, progress=None) -> ZooInfo:
    """Build the zoo ``kind``/``size`` (or reuse an identical one); see ``build_lm_zoo`` / ``build_vision_zoo``."""
    from evomerge.errors import EvomergeError

    if kind not in ZOO_KINDS:
        raise EvomergeError(f"unknown zoo kind {kind!r}; choose one of: {', '.join(ZOO_KINDS)}")
    if kind == "vision":
        from evomerge.zoo.vision import build_vision_zoo

        return build_vision_zoo(size, out, seed=seed, force=force, progress=progress)
    from evomerge.zoo.lm import build_lm_zoo

    return build_lm_zoo(size, out, seed=seed, force=force, progress=progress)

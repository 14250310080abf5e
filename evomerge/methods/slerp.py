"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.registry import REQUIRED, MergeMethod, register

#: Above this |cos| the two tensors are treated as parallel and lerped (mergekit's threshold).
DOT_THRESHOLD = 0.9995


def slerp(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Interpolate from ``base`` (t=0) to ``tensors[0]`` (t=1) along the great circle.

    The angle is measured between the flattened, L2-normalized tensors (a
    tensor with norm below 1e-8 is left unnormalized); near-parallel tensors
    (|cos| > 0.9995) fall back to linear interpolation. Computed in float32.
    """
    if not tensors:
        return base
    v0 = base.float()
    v1 = tensors[0].float()
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > DOT_THRESHOLD:
        out = (1 - t) * v0 + t * v1
    else:
        theta0 = torch.arccos(torch.tensor(dot, dtype=torch.float32))
        sin0 = torch.sin(theta0)
        s0 = torch.sin(theta0 - theta0 * t) / sin0
        s1 = torch.sin(theta0 * t) / sin0
        out = s0 * v0 + s1 * v1
    return out.to(base.dtype)


register(
    MergeMethod(
        name="slerp",
        kernel=slerp,
        global_params={"t": REQUIRED},
        max_sources=1,
    )
)

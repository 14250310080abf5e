"""Compiled task-vector merges (materialize.fused) equal the eager passes bit for bit."""

import pytest
import torch

from evomerge.materialize import fused


def inputs(n, dtype, seed):
    """A base and three sources whose deltas hold exact zeros, exact ties and both signs."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen).to(dtype)
    sources = []
    for i in range(3):
        delta = torch.randn(n, generator=gen) * 0.02
        delta[i::7] = 0
        delta[1::11] = delta[1]  # one value many times: ties at a cut
        sources.append((base.float() + delta).to(dtype))
    return base, sources


def trimmed(base, source, keep):
    """``|source - base|`` with all but the ``keep`` fraction largest set to 0, or None (nothing trimmed)."""
    if keep >= 1:
        return None
    magnitude = fused.magnitude(base, source)
    return torch.where(magnitude >= magnitude.quantile(1 - keep), magnitude, 0.0)


CASES = [
    dict(consensus=True, weight=[0.3, 0.7, 1.0], normalize=True, lam=1.0, keep=[0.2, 0.5, 1.0]),
    dict(consensus=True, weight=[0.9, -0.4, 0.6], normalize=True, lam=0.8, keep=[0.3, 0.3, 0.3]),
    dict(consensus=True, weight=[0.5, 0.5, 0.2], normalize=False, lam=1.3, keep=[1.0, 1.0, 1.0]),
    dict(consensus=False, weight=[0.3, 0.3, 0.3], normalize=True, lam=1.7, keep=[1.0, 1.0, 1.0]),
    dict(consensus=False, weight=[1.0, 0.25, 0.1], normalize=False, lam=1.0, keep=[1.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compiled_merge_equals_eager_passes(dtype, case, monkeypatch):
    params = CASES[case]
    base, sources = inputs(fused.MIN_NUMEL * 4 + 3, dtype, seed=case)
    magnitudes = [trimmed(base, s, k) for s, k in zip(sources, params["keep"])]
    total = sum(params["weight"])
    kwargs = dict(consensus=params["consensus"], weight=params["weight"], normalize=params["normalize"],
                  divisor=total if params["normalize"] else 1.0, lam=params["lam"])
    calls = []
    real = fused._compiled
    monkeypatch.setattr(fused, "_compiled", lambda name: calls.append(name) or real(name))
    compiled = fused.merge(base, sources, [m if m is None else m.clone() for m in magnitudes], **kwargs)
    assert calls == ["merge"] and not fused._broken
    monkeypatch.setattr(fused, "MIN_NUMEL", 1 << 40)  # every span eager
    eager = fused.merge(base, sources, magnitudes, **kwargs)
    assert compiled.dtype == dtype and torch.equal(compiled, eager)
    assert not torch.equal(compiled, base)


def test_compiled_magnitude_equals_the_task_vector_magnitude():
    from evomerge.methods.generalized_task_arithmetic import task_vector

    base, sources = inputs(fused.MIN_NUMEL + 5, torch.bfloat16, seed=7)
    assert torch.equal(fused.magnitude(base, sources[0]), task_vector(base.float(), sources[0]).abs())


def test_a_compiler_failure_falls_back_to_the_eager_passes(monkeypatch, caplog):
    base, sources = inputs(fused.MIN_NUMEL, torch.float32, seed=3)
    kwargs = dict(consensus=True, weight=[0.4, 0.4, 0.4], normalize=True, divisor=1.2, lam=1.0)
    want = fused.merge(base, sources, [None] * 3, **kwargs)

    def broken(name):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_broken", False)
    assert torch.equal(fused.merge(base, sources, [None] * 3, **kwargs), want)
    assert fused._broken and "no C++ compiler" in caplog.text

"""Compiled task-vector merges (materialize.fused) equal the eager passes bit for bit."""

import pytest
import torch

from evomerge.materialize import fused
from evomerge.methods import magnitude_index as magnitude_index_module
from evomerge.methods.generalized_task_arithmetic import task_vector
from evomerge.methods.magnitude_index import high_half


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


def cut(base, source, keep, at_ties=False):
    """A TIES cut keeping about ``keep`` of ``|source - base|`` (None: keep all): the magnitude at that
    quantile, or the magnitude repeated at every 11th entry (``inputs``) with the ties after the middle
    dropped."""
    if keep >= 1:
        return None
    magnitude = (source.float() - base.float()).abs()
    if at_ties:
        return float(magnitude[1]), magnitude.numel() // 2
    return float(magnitude.quantile(1 - keep)), magnitude.numel()


CASES = [
    dict(consensus=True, weight=[0.3, 0.7, 1.0], normalize=True, lam=1.0, keep=[0.2, 0.5, 1.0]),
    dict(consensus=True, weight=[0.9, -0.4, 0.6], normalize=True, lam=0.8, keep=[0.3, 0.3, 0.3]),
    dict(consensus=True, weight=[0.5, 0.5, 0.2], normalize=False, lam=1.3, keep=[1.0, 1.0, 1.0]),
    dict(consensus=False, weight=[0.3, 0.3, 0.3], normalize=True, lam=1.7, keep=[1.0, 1.0, 1.0]),
    dict(consensus=False, weight=[1.0, 0.25, 0.1], normalize=False, lam=1.0, keep=[1.0, 1.0, 1.0]),
    dict(consensus=True, weight=[0.5, 0.7, 0.6], normalize=True, lam=1.1, keep=[0.4, 1.0, 0.7], at_ties=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compiled_merge_equals_eager_passes(dtype, case, monkeypatch):
    params = CASES[case]
    base, sources = inputs(fused.MIN_NUMEL * 4 + 3, dtype, seed=case)
    cuts = [cut(base, s, k, params.get("at_ties", False)) for s, k in zip(sources, params["keep"])]
    total = sum(params["weight"])
    kwargs = dict(consensus=params["consensus"], weight=params["weight"], normalize=params["normalize"],
                  divisor=total if params["normalize"] else 1.0, lam=params["lam"])
    calls = []
    real = fused._compiled
    monkeypatch.setattr(fused, "_compiled", lambda name: calls.append(name) or real(name))
    compiled, eager = torch.full_like(base, float("nan")), torch.full_like(base, float("nan"))
    total = fused.merge(base, sources, cuts, out=compiled, **kwargs)
    assert calls == ["merge"] and not fused._broken
    monkeypatch.setattr(fused, "MIN_NUMEL", 1 << 40)  # every span eager
    eager_total = fused.merge(base, sources, cuts, out=eager, **kwargs)
    assert torch.equal(compiled, eager) and not torch.equal(compiled, base)
    for t in (total, eager_total):  # the NaN/Inf screen: a sum, in whatever order each route adds
        torch.testing.assert_close(t, compiled.float().sum(), rtol=1e-5, atol=1e-3)


def test_compiled_high_halves_are_those_of_the_task_vector_magnitude(monkeypatch):
    base, sources = inputs(fused.MIN_NUMEL + 5, torch.bfloat16, seed=7)
    sources[0][3] = float("nan")
    magnitude = task_vector(base.float(), sources[0]).abs()
    want = (magnitude.view(torch.int32) >> 16).to(torch.int16)
    calls = []
    real = fused._compiled
    monkeypatch.setattr(fused, "_compiled", lambda name: calls.append(name) or real(name))
    assert torch.equal(fused.high_halves(base, sources[0]), want) and calls == ["high_halves"]
    at = fused.magnitude_at(base, sources[0])(torch.tensor([0, 3, 17]))
    assert torch.equal(at.view(torch.int32), magnitude[[0, 3, 17]].view(torch.int32))  # NaN included


def test_the_screen_sums_the_stored_values():
    """A float16 merge that overflows stores inf: the sum returned with it must be inf too (not the float32 sum)."""
    n = fused.MIN_NUMEL * 2
    base = torch.zeros(n, dtype=torch.float16)
    sources = [torch.full((n,), 30000.0, dtype=torch.float16) for _ in range(3)]
    out = torch.zeros_like(base)
    total = fused.merge(base, sources, [None] * 3, out=out, consensus=False, weight=[1.0] * 3, normalize=False,
                        divisor=1.0, lam=1.0)
    assert not fused._broken and out.isinf().all() and total.isinf()


def test_a_compiler_failure_falls_back_to_the_eager_passes(monkeypatch, caplog):
    base, sources = inputs(fused.MIN_NUMEL, torch.float32, seed=3)
    kwargs = dict(consensus=True, weight=[0.4, 0.4, 0.4], normalize=True, divisor=1.2, lam=1.0)
    want, got = torch.empty_like(base), torch.empty_like(base)
    fused.merge(base, sources, [None] * 3, out=want, **kwargs)

    def broken(name):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_broken", False)
    fused.merge(base, sources, [None] * 3, out=got, **kwargs)
    assert torch.equal(got, want)
    assert fused._broken and "no C++ compiler" in caplog.text


def test_fused_block_merge_equals_the_eager_route_with_ties_at_the_cuts(monkeypatch):
    """TIES cuts applied inside the compiled merge, surplus ties merged again: the eager route's floats,
    with cuts from the bucket index and from exact tables."""
    from evomerge.materialize.blockwise import magnitude_index, merge_block
    from evomerge.materialize.pool import Block

    monkeypatch.setattr(fused, "MIN_NUMEL", 2)  # short tensors compiled too
    monkeypatch.setattr(fused, "ROW", 256)  # ties searched in several rows
    # these deltas are large next to the weights (real fine-tunes': ~4x fewer distinct magnitudes)
    monkeypatch.setattr(magnitude_index_module, "EXACT_RATIO", 16)
    sizes = (3, 5000, 20000, 40000, 1, 7000)
    block = Block("bfloat16", tuple(f"t{s}" for s in range(len(sizes))), tuple((n,) for n in sizes), sizes)
    base, sources = inputs(block.numel, torch.bfloat16, seed=11)  # bf16 deltas: few distinct magnitudes
    # NaN (a broken source) survives a cut and a whole tensor, not a tensor cut to nothing (source 0, tensor 5)
    sources[1][10] = sources[0][block.offsets[5] + 3] = float("nan")
    buckets = [magnitude_index(block, base, s) for s in sources]
    exact = [magnitude_index(block, base, s, exact=True) for s in sources]
    assert not any(index.exact for index in buckets)
    # tables for the long tensors without NaN; NaN (source 0, tensor 5; 1, 1) and short tensors take the bucket route
    assert [sorted(index.exact) for index in exact] == [[1, 2, 3], [2, 3, 5], [1, 2, 3, 5]]
    surplus = tied = 0
    for densities in ([0.3, 0.5, 0.9], [[1.0, 0.6, 0.1, 0.7, 0.5, 0.0], [0.2] * 6, [1.0] * 6], [0.05, 1.0, 0.5]):
        per_tensor = [d if isinstance(d, list) else [d] * len(sizes) for d in densities]
        kwargs = [{"weight": [0.7, 0.4 + 0.1 * s, -0.3], "density": [d[s] for d in per_tensor],
                   "normalize": s != 2, "lambda_": 1.0 if s < 3 else 1.2, "rescale": False, "rescale_method": "l1"}
                  for s in range(len(sizes))]
        eager, eager_total = merge_block(block, base, sources, kwargs, method="ties", indexes=buckets)
        assert eager_total.isnan()  # the surviving NaN reaches the screen
        for indexes in (buckets, exact):
            compiled, total = merge_block(block, base, sources, kwargs, method="ties", indexes=indexes, fused=True)
            assert torch.equal(compiled.view(torch.int16), eager.view(torch.int16)), densities
            assert total.isnan()
        for i, index in enumerate(buckets):
            ks = [int(kw["density"][i] * n) if kw["density"][i] < 1 else n for kw, n in zip(kwargs, sizes)]
            magnitude = task_vector(base.float(), sources[i]).abs()
            high = high_half(magnitude)
            cut = index.cut(lambda a, b: high[a:b], magnitude.__getitem__, ks)
            surplus += int(cut.dropped.sum())
            # the exact tables' points, their ties found, are the bucket route's cuts
            points, ties = exact[i].points(ks, lambda a, b: high[a:b], magnitude.__getitem__)
            for s, (value, j) in ties.items():
                a, b = block.offsets[s], block.offsets[s + 1]
                points[s] = (value, a + fused.nth_equal(base[a:b], [sources[i][a:b]], [value], [j])[0])
            assert set(ties) <= set(exact[i].exact)
            tied += len(ties)
            for s in range(len(sizes)):
                assert points[s] == (None if ks[s] >= sizes[s] else (float(cut.values[s]), int(cut.last[s]))), (i, s)
    assert surplus > 100 and tied > 10  # cuts fell inside runs of equal magnitudes

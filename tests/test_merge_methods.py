"""Every merge method against an independent NumPy reference and hand-checked cases."""

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.methods.registry import all_methods, apply_method
from evomerge.methods.sparsify import della_magprune, keep_count, magnitude, magnitude_outliers, random_drop


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def ref_gta(base, models, weights, densities=None, consensus=False, normalize=False, lam=1.0):
    """Straightforward NumPy TIES/task arithmetic (magnitude trim only)."""
    b = base.numpy().astype(np.float64)
    deltas = []
    for m, d in zip(models, densities or [1.0] * len(models)):
        delta = m.numpy().astype(np.float64) - b
        if d < 1:
            k = int(d * delta.size)
            flat = np.abs(delta).ravel()
            keep = np.zeros(delta.size, bool)
            keep[np.argsort(-flat, kind="stable")[:k]] = True
            delta = delta * keep.reshape(delta.shape)
        deltas.append(delta)
    D = np.stack(deltas)
    W = np.array(weights, dtype=np.float64).reshape(-1, *[1] * base.dim())
    WD = D * W
    if consensus:
        maj = np.where(WD.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(WD) == maj
        mixed = (WD * mask).sum(0)
        div = (W * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = WD.sum(0)
        div = W.sum() if abs(W.sum()) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


def test_registry_has_the_mergekit_methods():
    assert set(all_methods()) == {
        "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
    }


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_reference(normalize):
    base, a, b = rand(8, 6, seed=1), rand(8, 6, seed=2), rand(8, 6, seed=3)
    out = apply_method("task_arithmetic", base, [a, b], [{"weight": 0.7}, {"weight": -0.4}],
                       {"lambda": 0.6, "normalize": normalize})
    ref = ref_gta(base, [a, b], [0.7, -0.4], normalize=normalize, lam=0.6)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("densities", [[1.0, 1.0, 1.0], [0.5, 0.3, 0.9]])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(densities, normalize):
    base = rand(16, 12, seed=4)
    models = [base + 0.1 * rand(16, 12, seed=s) for s in (5, 6, 7)]
    weights = [1.0, 0.5, 0.8]
    out = apply_method("ties", base, models, [{"weight": w, "density": d} for w, d in zip(weights, densities)],
                       {"normalize": normalize, "lambda": 1.3})
    ref = ref_gta(base, models, weights, densities, consensus=True, normalize=normalize, lam=1.3)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_ties_sign_election_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([1.0, -2.0, 0.1, 3.0, 0.0])
    b = torch.tensor([2.0, 1.0, -0.2, -1.0, 0.0])
    # weighted sums [3, -1, -0.1, 2, 0] -> majority [+, -, -, +, + (zero counts as +)]
    # agreeing: [a,b] [a] [b] [a] [none: zeros never agree] -> divisor 0 -> 1
    out = apply_method("ties", base, [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(out, torch.tensor([1.5, -2.0, -0.2, 3.0, 0.0]))


def test_magnitude_keeps_exactly_k():
    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, -3.0, 0.0])
    kept = magnitude(delta.clone(), 0.5)  # sparsifiers work in place on a delta they own
    assert int((kept != 0).sum()) == 3 and kept[4] == -3.0
    assert torch.equal(magnitude(delta, 1.0), delta)
    # as mergekit 0.1.5 counts: a positive density keeps at least one entry, density 0 none
    assert int((magnitude(delta.clone(), 0.1) != 0).sum()) == 1 and magnitude(delta.clone(), 0.1)[4] == -3.0
    assert not magnitude(delta.clone(), 0.0).any()
    assert [keep_count(d, 6) for d in (0.0, 0.1, 0.5, 1.0, 1.5)] == [0, 1, 3, 6, 6]


def test_dare_expectation_equals_input_with_inverse_density():
    delta = rand(200, 200, seed=8)
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([random_drop(delta.clone(), 0.3, how="inverse_density", generator=gen) for _ in range(200)]).mean(0)
    # each entry averages 200 draws: E = delta, sd = |delta| * sqrt(0.7/0.3/200) ~ 0.11 |delta|
    assert float((mean - delta).abs().mean()) < 0.1 * float(delta.abs().mean())
    assert abs(float(mean.sum() - delta.sum())) < 0.02 * float(delta.abs().sum())


def test_dare_l1_rescale_restores_norm_and_keeps_density():
    delta = rand(300, 100, seed=9)
    out = random_drop(delta.clone(), 0.2, generator=torch.Generator().manual_seed(1))
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    assert float((out != 0).float().mean()) == pytest.approx(0.2, abs=0.01)


def test_dare_is_reproducible_by_seed():
    base, a, b = rand(50, 40, seed=1), rand(50, 40, seed=2), rand(50, 40, seed=3)
    params = [{"weight": 1.0, "density": 0.4}] * 2
    run = lambda s: apply_method("dare_ties", base, [a, b], params, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_dare_linear_matches_reference_given_the_masks():
    base, a = rand(30, 20, seed=1), rand(30, 20, seed=2)
    out = apply_method("dare_linear", base, [a], [{"weight": 0.5, "density": 0.5}],
                       {"rescale_method": "inverse_density"}, generator=torch.Generator().manual_seed(7))
    kept = (out - base) != 0
    expected = base + 0.5 * (a - base) * kept / 0.5
    torch.testing.assert_close(out, expected)
    assert 0.4 < float(kept.float().mean()) < 0.6


def _kept(mag, k):
    from evomerge.methods.sparsify import RankCut

    out = mag.reshape(-1).clone()
    return RankCut(out, k).apply_(out)


def test_rank_cut_is_exact_with_ties():
    mag = torch.tensor([0.5, 2.0, 2.0, 2.0, 1.0, 0.1, 3.0])
    assert _kept(mag, 3).tolist() == [0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0]
    # values repeat, as bf16-derived deltas do
    big = (rand(600_000, seed=3).abs() * 64).round() / 64 + 1e-3
    for k in (1, 1000, 123_457, 599_999):
        kept = _kept(big, k)
        assert int((kept != 0).sum()) == k
        cut = float(torch.kthvalue(big, big.numel() - k + 1).values)
        assert float(kept[kept != 0].min()) == cut
        # ties at the cut are kept lowest index first
        tied = torch.nonzero(big == cut).squeeze(1)
        kept_tied = torch.nonzero(kept == cut).squeeze(1)
        assert torch.equal(kept_tied, tied[: kept_tied.numel()])


def test_breadcrumbs_keeps_the_band_below_the_outliers():
    delta = torch.arange(1, 201, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(100)
    out = magnitude_outliers(delta, 0.5, gamma=0.05)
    kept = sorted(int(v) for v in out.abs()[out != 0])
    # 200 entries: drop the 10 largest (gamma) and the 90 smallest; keep |delta| 91..190
    assert kept == list(range(91, 191))


def test_breadcrumbs_ties_method_runs_consensus():
    base = rand(20, 20, seed=1)
    models = [base + rand(20, 20, seed=s) for s in (2, 3)]
    out = apply_method("breadcrumbs_ties", base, models, [{"weight": 1.0, "density": 0.6, "gamma": 0.05}] * 2)
    trimmed = [magnitude_outliers(m - base, 0.6, 0.05) for m in models]
    ref = ref_gta(base, [base + t for t in trimmed], [1.0, 1.0], consensus=True)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_della_keep_probability_follows_magnitude_rank():
    delta = torch.arange(1, 1001, dtype=torch.float32).repeat(400, 1)
    out = della_magprune(delta, 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(0))
    rate = (out != 0).float().mean(0)
    assert float(rate[:100].mean()) == pytest.approx(0.32, abs=0.03)  # smallest: ~density - eps
    assert float(rate[-100:].mean()) == pytest.approx(0.68, abs=0.03)  # largest: ~density + eps
    with pytest.raises(ValueError, match="della needs"):
        della_magprune(delta, 0.9, 0.15)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(t):
    a, b = rand(64, seed=1), rand(64, seed=2)
    out = apply_method("slerp", a, [b], global_params={"t": t})
    ua, ub = a.numpy() / np.linalg.norm(a.numpy()), b.numpy() / np.linalg.norm(b.numpy())
    theta = np.arccos(np.dot(ua.astype(np.float64), ub))
    ref = (np.sin((1 - t) * theta) * a.numpy() + np.sin(t * theta) * b.numpy()) / np.sin(theta)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_slerp_endpoints_and_parallel_fallback():
    a, b = rand(10, 10, seed=3), rand(10, 10, seed=4)
    torch.testing.assert_close(apply_method("slerp", a, [b], global_params={"t": 0.0}), a)
    torch.testing.assert_close(apply_method("slerp", a, [b], global_params={"t": 1.0}), b)
    near = a * 2.0 + 1e-6
    out = apply_method("slerp", a, [near], global_params={"t": 0.25})
    torch.testing.assert_close(out, 0.75 * a + 0.25 * near)


def test_linear_and_its_zero_weight_guard():
    a, b = rand(5, 5, seed=1), rand(5, 5, seed=2)
    out = apply_method("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, (a + 3 * b) / 4)
    out = apply_method("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], {"normalize": False})
    torch.testing.assert_close(out, a + 3 * b)
    with pytest.raises(EvomergeError, match="sum to 0"):
        apply_method("linear", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(filter_wise):
    base = rand(6, 8, seed=1)
    models = [base + rand(6, 8, seed=s) * 0.1 + 0.05 for s in (2, 3, 4)]
    out = apply_method("model_stock", base, models, global_params={"filter_wise": filter_wise})
    w0 = base.numpy().astype(np.float64)
    ws = [m.numpy().astype(np.float64) for m in models]
    if not filter_wise:
        w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = np.mean([(offs[i] * offs[j]).sum(-1) / (np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1))
                   for i in range(3) for j in range(i + 1, 3)], axis=0)[:, None]
    t = 3 * cos / (1 + 2 * cos)
    ref = (t * sum(ws) / 3 + (1 - t) * w0).reshape(6, 8)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_passthrough_copies_or_scales():
    a = rand(3, 3)
    assert apply_method("passthrough", None, [a]) is a
    torch.testing.assert_close(apply_method("passthrough", None, [a], [{"scale": 0.5}]), a * 0.5)


def test_kernels_keep_the_input_dtype():
    base = rand(8, 8).to(torch.bfloat16)
    other = (rand(8, 8, seed=2) * 0.1).to(torch.bfloat16) + base
    for name, params in [("ties", {"weight": 1.0, "density": 0.5}), ("task_arithmetic", {"weight": 1.0})]:
        assert apply_method(name, base, [other], [params]).dtype == torch.bfloat16


def test_unknown_method_and_parameter_list_the_valid_ones():
    with pytest.raises(EvomergeError, match="unknown merge_method 'tie'; known methods: .*ties"):
        apply_method("tie", torch.zeros(1), [torch.zeros(1)])
    with pytest.raises(EvomergeError, match="no parameter 'density'; valid: .*lambda"):
        apply_method("task_arithmetic", torch.zeros(1), [torch.zeros(1)], global_params={"density": 0.5})
    with pytest.raises(EvomergeError, match="'weight' is required"):
        apply_method("ties", torch.zeros(1), [torch.zeros(1)])

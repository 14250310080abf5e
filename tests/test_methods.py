import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.methods.registry import apply_method
from evomerge.methods.ties import magnitude_mask


def test_task_arithmetic_matches_formula():
    base = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([2.0, 2.0, 1.0])
    b = torch.tensor([1.0, 4.0, 3.0])
    out = apply_method("task_arithmetic", base, [a, b], [{"weight": 0.5}, {"weight": 2.0}], {"lambda": 0.3})
    expected = base + 0.3 * (0.5 * (a - base) + 2.0 * (b - base))
    assert torch.allclose(out, expected)


def test_task_arithmetic_keeps_dtype():
    base = torch.randn(4, 4, dtype=torch.bfloat16)
    out = apply_method("task_arithmetic", base, [base + 1, base - 1])
    assert out.dtype == torch.bfloat16


def test_magnitude_mask_keeps_exactly_k_even_with_ties():
    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, -3.0, 0.0])
    mask = magnitude_mask(delta, 0.5)
    assert int(mask.sum()) == 3
    assert bool(mask[4])


def test_ties_hand_computed():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 0.1, 3.0])
    b = torch.tensor([2.0, 1.0, -0.2, -1.0])
    # density 1: no trimming. Elected signs: sum = [3, -1, -0.1, 2] -> [+, -, -, +].
    # Agreeing entries: [a,b], [a], [b], [a]; normalize divides by the agreeing weights.
    out = apply_method("ties", base, [a, b], [{"weight": 1.0, "density": 1.0}] * 2)
    assert torch.allclose(out, torch.tensor([1.5, -2.0, -0.2, 3.0]))
    # density 0.5 keeps the two largest |delta| per model: a -> [0, -2, 0, 3], b -> [2, 1, 0, -1]
    out = apply_method("ties", base, [a, b], [{"density": 0.5}] * 2, {"normalize": False})
    # sums [2, -1, 0, 2] -> signs [+, -, 0, +]; agreeing: [b]=2, [a]=-2, none, [a]=3
    assert torch.allclose(out, torch.tensor([2.0, -2.0, 0.0, 3.0]))


def test_unknown_method_and_parameter_are_named():
    with pytest.raises(EvomergeError, match="unknown merge_method 'tie'"):
        apply_method("tie", torch.zeros(1), [torch.zeros(1)])
    with pytest.raises(EvomergeError, match="'density'"):
        apply_method("task_arithmetic", torch.zeros(1), [torch.zeros(1)], global_params={"density": 0.5})

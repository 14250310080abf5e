"""`zoo check` (lm-eval) reproduces the build's own verification table exactly."""

from evomerge.zoo.check import check_zoo


def test_check_matches_build_verification(tiny_zoo):
    result = check_zoo(tiny_zoo, split="test", batch_size=32)
    built = tiny_zoo.manifest["verification"]["table"]
    shared = [m for m in result.table if m in built]
    assert {"base", *tiny_zoo.finetune_tasks, "task_arithmetic(lambda=0.3)"} <= set(shared)
    for model in shared:
        assert result.table[model] == built[model], model
    assert "ties(density=0.5, lambda=0.5)" in result.table
    assert result.verdict["best_merge"] in result.table

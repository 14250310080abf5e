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


def test_a_bad_json_path_is_refused_before_scoring(tiny_zoo, tmp_path):
    import subprocess
    import sys

    for target, message in ((tmp_path / "no" / "t.json", "its folder"), (tmp_path, "is a directory")):
        result = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "check", str(tiny_zoo.path), "--json",
                                 str(target)], capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and message in result.stderr and "exact match" not in result.stdout

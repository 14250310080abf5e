import json
import subprocess
import sys

import pytest


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_import_is_light():
    code = "import sys, evomerge, evomerge.cli; print(sorted(m for m in ('torch','transformers','lm_eval','ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "zoo" in out.stdout
    out = run_cli("zoo", "build", "--help")
    assert out.returncode == 0 and "--size" in out.stdout and "--seed" in out.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["zoo", "build", "vision3d", "--size", "tiny"], "unknown zoo kind 'vision3d'"),
        (["zoo", "build", "lm", "--size", "huge"], "unknown LM zoo size 'huge'"),
        (["zoo", "check", "/nonexistent/zoo"], "not an evomerge zoo"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    out = run_cli(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_manifest_is_named(tmp_path):
    (tmp_path / "zoo.json").write_text("{not json")
    out = run_cli("zoo", "check", str(tmp_path))
    assert out.returncode == 2 and "invalid JSON" in out.stderr and "zoo.json" in out.stderr


def test_zoo_check_cli_prints_table_and_json(tiny_zoo, tmp_path):
    target = tmp_path / "check.json"
    out = run_cli("zoo", "check", str(tiny_zoo.path), "--limit", "8", "--json", str(target))
    assert out.returncode in (0, 1), out.stderr
    data = json.loads(target.read_text())
    assert set(data["table"]) >= {"base", *tiny_zoo.finetune_tasks}
    assert "base" in out.stdout and "best merge" in out.stdout
    assert out.returncode == (0 if data["verdict"]["passed"] else 1)


def test_errors_print_bracketed_yaml_verbatim(tiny_zoo, tmp_path):
    """Messages quote YAML lists such as [low, high]; the console must not read them as markup."""
    from search_helpers import tiny_space

    space = tiny_space(tiny_zoo, tmp_path, genome={"type": "parameter", "method": "ties", "genes": {"density": [0.5, 0.2]}})
    out = run_cli("search", str(space), "--dry-run")
    assert out.returncode == 2
    assert "bounds [0.5, 0.2] are empty; give [low, high] with low < high" in " ".join(out.stderr.split())

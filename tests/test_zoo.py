import json
import os
import shutil

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.zoo import build_zoo, load_zoo
from evomerge.zoo.lm import verify


def test_tiny_zoo_models_load_with_transformers(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    assert set(tiny_zoo.models) == {"base", *tiny_zoo.finetune_tasks}
    assert len(tiny_zoo.finetune_tasks) >= 3
    for name, path in tiny_zoo.models.items():
        # tiny shards are capped at 100KB so the sharded-index path is exercised
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((path / s).exists() for s in shards)
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert isinstance(model, LlamaForCausalLM)
        tok = AutoTokenizer.from_pretrained(str(path))
        assert tok.is_fast
        assert tok.decode(tok("sort:cab=")["input_ids"]) == "sort:cab="


def test_finetunes_are_small_steps_from_the_base(tiny_zoo):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_zoo.models["base"])).state_dict()
    for name in tiny_zoo.finetune_tasks:
        ft = AutoModelForCausalLM.from_pretrained(str(tiny_zoo.models[name])).state_dict()
        assert ft.keys() == base.keys()
        num = sum(float((ft[k] - base[k]).norm() ** 2) for k in base) ** 0.5
        den = sum(float(base[k].norm() ** 2) for k in base) ** 0.5
        assert 0 < num / den < 0.5, name


def test_manifest_records_recipe_and_verification(tiny_zoo):
    m = tiny_zoo.manifest
    assert m["kind"] == "lm" and m["size"] == "tiny" and m["seed"] == 0
    assert m["spec"]["hidden_size"] == 64
    table = m["verification"]["table"]
    assert set(tiny_zoo.finetune_tasks) <= set(table)
    for row in table.values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # the tiny base learned something from its few steps: not all zero
    assert max(table["base"].values()) > 0


def test_same_spec_is_reused_not_rebuilt(tiny_zoo):
    before = {p: p.stat().st_mtime_ns for p in tiny_zoo.path.rglob("*") if p.is_file()}
    again = build_zoo("lm", "tiny", tiny_zoo.path, seed=0)
    assert again.manifest["fingerprint"] == tiny_zoo.manifest["fingerprint"]
    after = {p: p.stat().st_mtime_ns for p in tiny_zoo.path.rglob("*") if p.is_file()}
    assert before == after


def test_build_is_deterministic(tiny_zoo, tmp_path):
    from safetensors.torch import load_file

    other = build_zoo("lm", "tiny", tmp_path / "again", seed=0)
    for name in tiny_zoo.models:
        for shard in sorted(tiny_zoo.models[name].glob("*.safetensors")):
            a = load_file(str(shard))
            b = load_file(str(other.models[name] / shard.name))
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (name, shard.name)
    assert (tiny_zoo.tasks_dir / "data/rev/test.jsonl").read_text() == (
        other.tasks_dir / "data/rev/test.jsonl"
    ).read_text()


def test_unlabeled_prompts_have_no_answers_and_are_disjoint(tiny_zoo):
    rows = [json.loads(l) for l in (tiny_zoo.tasks_dir / "unlabeled.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == set(tiny_zoo.finetune_tasks)
    assert all(set(r) == {"task", "prompt"} for r in rows)
    for task in tiny_zoo.finetune_tasks:
        labelled = set()
        for split in ("validation", "test"):
            for line in (tiny_zoo.tasks_dir / "data" / task / f"{split}.jsonl").read_text().splitlines():
                labelled.add(json.loads(line)["prompt"])
        assert not labelled & {r["prompt"] for r in rows if r["task"] == task}


def test_moved_zoo_repoints_task_files(tiny_zoo, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_zoo.path, moved)
    info = load_zoo(moved)
    text = (info.tasks_dir / "zoo_rev.yaml").read_text()
    assert str(moved.resolve()) in text and str(tiny_zoo.path) not in text


@pytest.mark.parametrize(
    "kind,size,match",
    [("vision3d", "tiny", "unknown zoo kind 'vision3d'"), ("lm", "huge", "unknown LM zoo size 'huge'")],
)
def test_unknown_kind_or_size_is_a_clear_error(kind, size, match, tmp_path):
    with pytest.raises(EvomergeError, match=match):
        build_zoo(kind, size, tmp_path / "z")
    assert not (tmp_path / "z").exists()


def test_foreign_non_empty_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(EvomergeError, match="not empty and is not an evomerge zoo"):
            build_zoo("lm", "tiny", out, force=force)
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_zoo_of_other_spec_needs_force(tiny_zoo, tmp_path):
    out = tmp_path / "z"
    shutil.copytree(tiny_zoo.path, out)
    with pytest.raises(EvomergeError, match="holds a different zoo"):
        build_zoo("lm", "tiny", out, seed=1)
    assert load_zoo(out).manifest["seed"] == 0
    # --force replaces what a build wrote, never files of the user's kept beside it
    (out / "my-runs").mkdir()
    (out / "my-runs" / "notes.txt").write_text("precious")
    with pytest.raises(EvomergeError, match=r"not part of the zoo \(my-runs/notes.txt\); --force would delete them"):
        build_zoo("lm", "tiny", out, seed=1, force=True)
    assert (out / "my-runs" / "notes.txt").read_text() == "precious" and load_zoo(out).manifest["seed"] == 0
    shutil.rmtree(out / "my-runs")  # inside the zoo's own folders too (a task YAML of the user's)
    (out / "tasks" / "my_task.yaml").write_text("task: mine")
    with pytest.raises(EvomergeError, match=r"not part of the zoo \(tasks/my_task.yaml\)"):
        build_zoo("lm", "tiny", out, seed=1, force=True)
    assert (out / "tasks" / "my_task.yaml").exists()


def test_a_damaged_zoo_is_not_reused_and_force_rebuilds_it(tiny_zoo, tmp_path):
    out = tmp_path / "z"
    shutil.copytree(tiny_zoo.path, out)
    shard = sorted((out / "rev").glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(EvomergeError, match=rf"the zoo is damaged \(rev/{shard.name} is missing\); rebuild it with --force"):
        build_zoo("lm", "tiny", out)
    build_zoo("lm", "tiny", out, force=True)
    assert shard.is_file() and load_zoo(out).manifest["fingerprint"] == tiny_zoo.manifest["fingerprint"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_out_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(EvomergeError, match="permission denied"):
            build_zoo("lm", "tiny", locked / "z")
    finally:
        locked.chmod(0o700)


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(EvomergeError, match="not a directory"):
        build_zoo("lm", "tiny", target)
    assert target.read_text() == "x"


def test_out_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EvomergeError, match="is a file, not a directory"):
        build_zoo("lm", "tiny", blocker / "z")
    assert blocker.read_text() == "x"


def test_zoo_dirs_get_normal_permissions(tiny_zoo):
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_zoo.path.stat().st_mode & 0o777 == 0o777 & ~umask


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import evomerge.zoo.lm as lm

    def boom(*args, **kwargs):
        raise RuntimeError("injected crash while saving")

    monkeypatch.setattr(lm, "_save_model", boom)
    with pytest.raises(RuntimeError, match="injected"):
        build_zoo("lm", "tiny", tmp_path / "z")
    assert list(tmp_path.iterdir()) == []


def test_verify_acceptance_logic():
    table = {
        "base": {"a": 0.5, "b": 0.5},
        "a": {"a": 0.8, "b": 0.2},
        "b": {"a": 0.3, "b": 0.75},
        "merge": {"a": 0.7, "b": 0.6},
    }
    v = verify(table, ["a", "b"])
    assert v["finetunes_ok"] and v["merge_beats_sources"] and v["passed"]
    assert v["best_merge"] == "merge" and v["best_source"] == "b"
    table["b"]["b"] = 0.65  # gain 0.15 < 0.20
    assert not verify(table, ["a", "b"])["passed"]
    table["merge"] = {"a": 0.5, "b": 0.4}
    assert not verify(table, ["a", "b"])["merge_beats_sources"]

"""The zoo's task YAMLs run under real lm-eval and agree with the build's own scorer."""

import json

import pytest


@pytest.fixture(scope="module")
def harness(tiny_zoo):
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_zoo.models["base"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16)
    return model, tok, lm, TaskManager(include_path=str(tiny_zoo.tasks_dir), include_defaults=False)


def _rows(zoo, task, split):
    lines = (zoo.tasks_dir / "data" / task / f"{split}.jsonl").read_text().splitlines()
    return [(r["prompt"], r["answer"]) for r in map(json.loads, lines)]


def test_task_manager_finds_test_val_and_group_tasks(tiny_zoo, harness):
    manager = harness[3]
    names = set(manager.all_tasks)
    for t in tiny_zoo.finetune_tasks:
        assert {f"zoo_{t}", f"zoo_{t}_val", f"zoo_{t}_choice", f"zoo_{t}_choice_val"} <= names
    assert {"zoo", "zoo_val"} <= names


@pytest.mark.parametrize("split", ["test", "validation"])
def test_lm_eval_exact_match_equals_build_scorer(tiny_zoo, harness, split):
    from lm_eval import simple_evaluate

    from evomerge.zoo.lmeval_tasks import task_name
    from evomerge.zoo.train import CharCodec, exact_match

    model, tok, lm, manager = harness
    names = [task_name(t, split) for t in tiny_zoo.finetune_tasks]
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True,
                          bootstrap_iters=0, verbosity="ERROR")
    codec = CharCodec(tok)
    max_toks = tiny_zoo.manifest["spec"]["max_gen_toks"]
    for task, name in zip(tiny_zoo.finetune_tasks, names):
        rows = _rows(tiny_zoo, task, split)
        # lm-eval scored exactly this split's documents...
        assert [s["doc"]["prompt"] for s in out["samples"][name]] == [p for p, _ in rows]
        # ...and its exact match equals our independent greedy decoder's.
        ours = exact_match(model, codec, rows, max_toks)
        assert out["results"][name]["exact_match,none"] == pytest.approx(ours)


def test_zoo_built_before_the_choice_tasks_gains_them_on_load(tiny_zoo, tmp_path):
    import shutil

    from evomerge.zoo.registry import load_zoo

    old = tmp_path / "old"
    shutil.copytree(tiny_zoo.path, old)
    for f in old.glob("tasks/*_choice*.yaml"):
        f.unlink()
    info = load_zoo(old)
    assert {f"zoo_{t}_choice_val.yaml" for t in info.finetune_tasks} <= {f.name for f in info.tasks_dir.glob("*.yaml")}

"""The lm_eval evaluator's prepared requests score every candidate exactly as `simple_evaluate` does."""

import pytest

from evomerge.evaluation import build_evaluator
from evomerge.recipe import Recipe

#: (evaluator settings, simple_evaluate keywords): generate_until exact match and two-choice
#: loglikelihood tasks, both splits, a limit and few-shot contexts.
CONFIGS = [
    ({"tasks": ["zoo_sort", "zoo_rev_choice"], "split": "test"}, {}),
    ({"tasks": ["zoo_rev_val", "zoo_copy_choice_val", "zoo_sort_choice_val"], "split": "validation",
      "limit": 20, "num_fewshot": 2}, {"limit": 20, "num_fewshot": 2}),
]


@pytest.fixture(scope="module")
def merger(tiny_zoo):
    from evomerge.materialize.resident import ResidentMerger

    m = tiny_zoo.models
    return ResidentMerger(m["base"], [m[t] for t in tiny_zoo.finetune_tasks], device="cpu", threads=1)


def candidates(zoo):
    """Each zoo model alone, two TIES merges and a layer path (the live model's layer list swapped)."""
    m = {k: str(v) for k, v in zoo.models.items()}
    fts = zoo.finetune_tasks
    alone = [{"merge_method": "linear", "models": [{"model": m[name], "parameters": {"weight": 1.0}}]}
             for name in ["base", *fts]]
    ties = [{"merge_method": "ties", "base_model": m["base"], "parameters": {"normalize": False},
             "models": [{"model": m[t], "parameters": {"weight": w, "density": d}} for t in fts]}
            for w, d in [(0.6, 0.5), (1.0, 0.9)]]
    path = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m[fts[1]], "layer_range": [0, 2]}]},
        {"sources": [{"model": m[fts[0]], "layer_range": [1, 2]}]}]}
    return [Recipe.model_validate(r) for r in [*alone, *ties, path]]


@pytest.mark.parametrize("settings,same", CONFIGS)
def test_prepared_requests_score_like_simple_evaluate(tiny_zoo, merger, settings, same):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo.models["base"]))
    ev = build_evaluator({"type": "lm_eval", "include_path": str(tiny_zoo.tasks_dir), "batch_size": 16, **settings})
    manager = TaskManager(include_path=str(tiny_zoo.tasks_dir), include_defaults=False)
    recipes = candidates(tiny_zoo)
    expected = []
    for recipe in recipes:
        model = merger.materialize(recipe)
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16), tasks=settings["tasks"],
                              task_manager=manager, bootstrap_iters=0, verbosity="ERROR", **same)
        expected.append({f"{task}/{key.split(',')[0]}": value for task, res in out["results"].items()
                         for key, value in res.items() if "," in key and "_stderr" not in key})
    # forwards then backwards: answers must not leak from one candidate into the next
    order = [*range(len(recipes)), *reversed(range(len(recipes)))]
    for i in order:
        assert ev(merger.materialize(recipes[i]), tok) == expected[i], recipes[i].merge_method
    seen = {tuple(sorted(e.items())) for e in expected}
    assert len(seen) > 3  # the candidates really score differently


def test_prepared_requests_are_built_once(tiny_zoo, merger):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo.models["base"]))
    ev = build_evaluator({"type": "lm_eval", "include_path": str(tiny_zoo.tasks_dir), "tasks": ["zoo_rev_choice_val"]})
    model = merger.materialize(candidates(tiny_zoo)[0])
    ev.setup(model, tok)
    prepared, lm = ev._prepared, ev._lm
    instances = [id(i) for i in prepared.tasks["zoo_rev_choice_val"].instances]
    assert prepared.num_requests == 2 * tiny_zoo.manifest["spec"]["n_validation"]  # two choices per item
    for recipe in candidates(tiny_zoo)[:3]:
        ev(merger.materialize(recipe), tok)
    assert ev._prepared is prepared and ev._lm is lm
    assert [id(i) for i in prepared.tasks["zoo_rev_choice_val"].instances] == instances

"""Evaluators on the tiny zoo: real lm-eval runs, numerical oracles, clear failures."""

import json
import math
import shutil

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.evaluation import EvaluationError, build_evaluator


@pytest.fixture(scope="module")
def live(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_zoo.models["base"])
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def load_weights(model, path):
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(state[name])


def test_lm_eval_scores_each_candidate_with_tasks_built_once(tiny_zoo, live):
    model, tok = live
    tasks = [f"zoo_{t}" for t in tiny_zoo.finetune_tasks]
    ev = build_evaluator({"type": "lm_eval", "tasks": tasks, "include_path": str(tiny_zoo.tasks_dir),
                          "split": "test", "batch_size": 16})
    table = tiny_zoo.manifest["verification"]["table"]
    try:
        ev.setup(model, tok)
        built = ev._prepared
        for candidate in ["base", *tiny_zoo.finetune_tasks, "base"]:
            load_weights(model, tiny_zoo.models[candidate])  # in place, as the resident merger will
            metrics = ev(model, tok)
            assert ev._prepared is built
            # equals the zoo build's independent greedy scorer on the test split
            assert {t: metrics[f"zoo_{t}/exact_match"] for t in tiny_zoo.finetune_tasks} == table[candidate]
    finally:
        load_weights(model, tiny_zoo.models["base"])


def test_lm_eval_validation_split_scores_the_validation_documents(tiny_zoo, live):
    from evomerge.zoo.train import CharCodec, exact_match

    model, tok = live
    ev = build_evaluator({"type": "lm_eval", "tasks": ["zoo_rev"], "include_path": str(tiny_zoo.tasks_dir)})
    got = ev(model, tok)["zoo_rev/exact_match"]
    rows = [json.loads(l) for l in (tiny_zoo.tasks_dir / "data/rev/validation.jsonl").read_text().splitlines()]
    ours = exact_match(model, CharCodec(tok), [(r["prompt"], r["answer"]) for r in rows],
                       tiny_zoo.manifest["spec"]["max_gen_toks"])
    assert got == pytest.approx(ours)


def test_lm_eval_bad_tasks_are_clear(tiny_zoo, live):
    model, tok = live
    ev = build_evaluator({"type": "lm_eval", "tasks": ["zoo_nope"], "include_path": str(tiny_zoo.tasks_dir)})
    with pytest.raises(EvomergeError, match="unknown task 'zoo_nope'.*available: .*zoo_rev"):
        ev.setup(model, tok)
    with pytest.raises(EvomergeError, match="split must be one of"):
        build_evaluator({"type": "lm_eval", "tasks": ["zoo_rev"], "split": "train"})
    group = build_evaluator({"type": "lm_eval", "tasks": ["zoo"], "include_path": str(tiny_zoo.tasks_dir)})
    with pytest.raises(EvomergeError, match="is a group"):
        group.setup(model, tok)


def test_lm_eval_names_a_task_yaml_that_does_not_parse(tiny_zoo, live, tmp_path):
    model, tok = live
    tasks = tmp_path / "tasks"
    shutil.copytree(tiny_zoo.tasks_dir, tasks)
    broken = tasks / "zoo_copy.yaml"
    broken.write_text(broken.read_text().replace("task: zoo_copy", "task: [zoo_copy"))
    ev = build_evaluator({"type": "lm_eval", "tasks": ["zoo_copy"], "include_path": str(tasks)})
    with pytest.raises(EvomergeError, match=r"unknown task 'zoo_copy'.*zoo_copy.yaml does not parse \(line \d+: "):
        ev.setup(model, tok)


def test_entropy_is_uniform_for_a_blank_head_and_lower_when_trained(tiny_zoo, live):
    model, tok = live
    ev = build_evaluator({"type": "entropy", "path": str(tiny_zoo.tasks_dir / "unlabeled.jsonl")})
    trained = ev(model, tok)["entropy"]
    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.zero_()
        uniform = ev(model, tok)["entropy"]
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert uniform == pytest.approx(math.log(len(tok)), rel=1e-5)
    assert 0 < trained < uniform


def test_named_evaluators_prefix_their_metrics(tiny_zoo, live):
    model, tok = live
    path = str(tiny_zoo.tasks_dir / "unlabeled.jsonl")
    plain = build_evaluator({"type": "entropy", "path": path})(model, tok)
    named = build_evaluator({"type": "entropy", "path": path, "name": "copy"})(model, tok)
    assert named == {"copy/entropy": plain["entropy"]}
    with pytest.raises(EvomergeError, match="name must be a non-empty string without '/'"):
        build_evaluator({"type": "entropy", "path": path, "name": "a/b"})


def test_perplexity_equals_vocab_size_for_a_blank_head(tiny_zoo, live, tmp_path):
    model, tok = live
    data = tmp_path / "texts.jsonl"
    rows = [json.loads(l) for l in (tiny_zoo.tasks_dir / "data/rev/test.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({"text": r["prompt"] + r["answer"] + "\n"}) + "\n" for r in rows))
    ev = build_evaluator({"type": "perplexity", "path": str(data)})
    ev(model, tok)
    one = build_evaluator({"type": "perplexity", "path": str(data), "limit": 1})
    ids = tok(rows[0]["prompt"] + rows[0]["answer"] + "\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert one(model, tok)["perplexity"] == pytest.approx(expected, rel=1e-5)
    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.zero_()
        assert ev(model, tok)["perplexity"] == pytest.approx(len(tok), rel=1e-4)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)


def test_python_evaluator_and_its_failures(live, tmp_path):
    model, tok = live
    plugin = tmp_path / "my_metric.py"
    (tmp_path / "my_metric_helpers.py").write_text("HALF = 0.5\n")
    plugin.write_text(
        "import numpy, torch\n"
        "from my_metric_helpers import HALF\n"  # a module beside the file imports, as in a script
        "def scalars(model, tokenizer):\n"
        "    return {'a': numpy.float32(HALF), 'b': numpy.int64(3), 'c': torch.tensor(0.25)}\n"
        "def score(model, tokenizer, scale=1.0):\n"
        "    return {'params': scale * sum(p.numel() for p in model.parameters())}\n"
        "def text(model, tokenizer):\n    return {'x': 'high'}\n"
        "def nan(model, tokenizer):\n    return {'x': float('nan')}\n"
        "def boom(model, tokenizer):\n    raise RuntimeError('kaput')\n"
        "def leave(model, tokenizer):\n    raise SystemExit(3)\n"
    )
    ev = build_evaluator({"type": "python", "function": f"{plugin}:score", "kwargs": {"scale": 2.0}})
    assert ev(model, tok) == {"params": 2.0 * sum(p.numel() for p in model.parameters())}
    assert build_evaluator({"type": "python", "function": f"{plugin}:scalars"})(model, tok) == {"a": 0.5, "b": 3.0,
                                                                                              "c": 0.25}
    for fn, match in [("text", "metric 'x' is not a number"), ("nan", "metric 'x' is nan"),
                      ("boom", "RuntimeError: kaput"), ("leave", r"called sys.exit\(3\)")]:
        with pytest.raises(EvaluationError, match=match):
            build_evaluator({"type": "python", "function": f"{plugin}:{fn}"})(model, tok)
    assert ev(model, tok)["params"] > 0  # still usable after failures
    with pytest.raises(EvomergeError, match="has no function 'missing'"):
        build_evaluator({"type": "python", "function": f"{plugin}:missing"})
    with pytest.raises(EvomergeError, match="'module:function'"):
        build_evaluator({"type": "python", "function": "no_colon"})
    with pytest.raises(EvomergeError, match="kwargs must be a mapping"):
        build_evaluator({"type": "python", "function": f"{plugin}:score", "kwargs": [1, 2]})
    # a misspelt argument is found when the evaluator is built (the space is read), not by every candidate
    with pytest.raises(EvomergeError, match=r"score cannot be called as function\(model, tokenizer, scael=\.\.\.\): "
                                            r".*unexpected keyword argument 'scael'"):
        build_evaluator({"type": "python", "function": f"{plugin}:score", "kwargs": {"scael": 2.0}})
    with pytest.raises(EvomergeError, match="cannot be called as function"):
        build_evaluator({"type": "python", "function": f"{plugin}:text", "kwargs": {"scale": 2.0}})


def test_evaluator_configs_are_validated():
    with pytest.raises(EvomergeError, match="unknown evaluator 'bleu'; known: accuracy, entropy, lm_eval, multihead_entropy, perplexity, python"):
        build_evaluator({"type": "bleu"})
    with pytest.raises(EvomergeError, match="unknown setting 'taskz'; valid: tasks"):
        build_evaluator({"type": "lm_eval", "taskz": ["a"]})
    with pytest.raises(EvomergeError, match="missing setting 'path'"):
        build_evaluator({"type": "entropy"})
    with pytest.raises(EvomergeError, match="limit must be a whole number >= 1, not -1"):
        build_evaluator({"type": "lm_eval", "tasks": ["a"], "limit": -1})
    with pytest.raises(EvomergeError, match="num_fewshot must be a whole number >= 0, not -1"):
        build_evaluator({"type": "lm_eval", "tasks": ["a"], "num_fewshot": -1})
    # the file-based evaluators check their counts too, when the space is read (not at the first candidate)
    for spec, match in [({"type": "perplexity", "path": "x.jsonl", "batch_size": 0}, "perplexity: batch_size must be a whole number >= 1"),
                        ({"type": "perplexity", "path": "x.jsonl", "max_length": 1}, "perplexity: max_length must be a whole number >= 2"),
                        ({"type": "entropy", "path": "x.jsonl", "limit": 0}, "entropy: limit must be a whole number >= 1, not 0"),
                        ({"type": "accuracy", "path": "x.jsonl", "batch_size": "4"}, "accuracy: batch_size must be a whole number"),
                        ({"type": "multihead_entropy", "paths": ["a"], "heads_from": ["b"], "limit": -1},
                         "multihead_entropy: limit must be")]:
        with pytest.raises(EvomergeError, match=match):
            build_evaluator(spec)
    # a string of tasks is read as lm_eval's --tasks reads it
    assert build_evaluator({"type": "lm_eval", "tasks": "zoo_rev, zoo_sort"}).task_names == ["zoo_rev", "zoo_sort"]


def test_texts_with_nothing_to_score_are_refused_at_setup(live, tmp_path):
    model, tok = live
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "prompt": t}) + "\n" for t in ["", "a", ""]))
    # one character is one token here: nothing is predicted from a previous token
    with pytest.raises(EvomergeError, match="no 'text' text has two or more tokens"):
        build_evaluator({"type": "perplexity", "path": str(data)}).setup(model, tok)
    with pytest.raises(EvomergeError, match=r"texts\.jsonl: row 1 has an empty 'prompt'"):
        build_evaluator({"type": "entropy", "path": str(data)}).setup(model, tok)
    # empty texts among scorable ones are skipped: they have no token to score
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "abc", "", "de"]))
    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc", "de"]))
    assert (build_evaluator({"type": "perplexity", "path": str(data), "batch_size": 2})(model, tok)
            == build_evaluator({"type": "perplexity", "path": str(kept), "batch_size": 2})(model, tok))


def test_images_for_a_text_model_are_refused_at_setup(live):
    model, tok = live
    with pytest.raises(EvomergeError, match="entropy: unused.npz holds images, but LlamaForCausalLM takes text"):
        build_evaluator({"type": "entropy", "path": "unused.npz"}).setup(model, tok)


def test_accuracy_counts_argmax_matches_and_names_bad_labels(tiny_zoo, tmp_path):
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from evomerge.errors import EvomergeError
    from evomerge.evaluation.registry import build_evaluator

    torch.manual_seed(0)
    base = tiny_zoo.models["base"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = ["abc", "zyxwv", "q", "hello", "mm", "sorted", "k"]
    with torch.no_grad():  # the oracle: one unpadded forward per text
        predicted = [int(model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits.argmax(-1))
                     for t in texts]
    labels = [p if i < 4 else (p + 1) % 3 for i, p in enumerate(predicted)]  # 4 right, 3 wrong
    rows = [{"text": t, "label": ["a", "b", "c"][y] if i % 2 else y} for i, (t, y) in enumerate(zip(texts, labels))]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluator = build_evaluator({"type": "accuracy", "path": str(data), "batch_size": 3})
    assert evaluator(model, tokenizer) == {"accuracy": pytest.approx(4 / 7)}
    data.write_text(json.dumps({"text": "x", "label": "d"}) + "\n")
    with pytest.raises(EvomergeError, match=r"cls\.jsonl: row 1: label 'd' is not a class of the model \(0\.\.2 or a, b, c\)"):
        build_evaluator({"type": "accuracy", "path": str(data)}).setup(model, tokenizer)


def test_reports_switch_file_evaluators_to_their_test_path():
    from evomerge.evaluation.objective import Objective

    objective = Objective.model_validate({
        "evaluators": [
            {"type": "accuracy", "path": "val.npz", "test_path": "test.npz", "limit": 8, "name": "a"},
            {"type": "entropy", "path": "unlabeled.npz", "limit": 8},
            {"type": "lm_eval", "tasks": ["t"], "split": "validation", "limit": 8},
        ],
        "fitness": [{"name": "f", "direction": "maximize", "metrics": ["a/accuracy"]}],
    })
    test = objective.for_split("test")
    assert test[0] == {"type": "accuracy", "path": "test.npz", "name": "a"}
    # no test_path: left out, or its validation numbers would be reported as test ones
    assert test[1] == {"type": "lm_eval", "tasks": ["t"], "split": "test"} and len(test) == 2
    assert objective.untested() == ["entropy"]
    assert objective.for_split("validation")[0] == {"type": "accuracy", "path": "val.npz", "limit": 8, "name": "a"}
    assert build_evaluator({"type": "accuracy", "path": "val.npz", "test_path": "test.npz"}).path == "val.npz"

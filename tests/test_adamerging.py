"""AdaMerging on the tiny LM zoo: training lowers entropy, the export reproduces the trained merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from evomerge.adamerging import AdaMergingSettings, EntropyTask, FunctionalMerge, adamerge, coefficients_from_recipe
from evomerge.adamerging.config import AdaMergingConfig
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe


def zoo_config(zoo, **settings) -> AdaMergingConfig:
    tasks = [{"model": str(zoo.models[t]), "unlabeled": str(zoo.tasks_dir / "unlabeled.jsonl"), "where": {"task": t}}
             for t in zoo.finetune_tasks]
    return AdaMergingConfig.model_validate({"base_model": str(zoo.models["base"]), "tasks": tasks, **settings})


@pytest.fixture(scope="module")
def tasks(tiny_zoo):
    return zoo_config(tiny_zoo).build_tasks()


def state_of(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("granularity,plus_plus", [("task", False), ("layer", False), ("layer", True), ("tensor", True)])
def test_training_lowers_entropy_and_the_export_is_the_trained_merge(tiny_zoo, tasks, tmp_path, granularity, plus_plus):
    from evomerge.materialize.export import merge_to_dir

    settings = AdaMergingSettings(granularity=granularity, plus_plus=plus_plus, steps=30, lr=5e-3)
    result = adamerge(tiny_zoo.models["base"], tasks, settings, device="cpu")
    assert result.stopped is None and len(result.losses) == 30
    assert result.final_entropy < result.initial_entropy
    moved = (result.coefficients - settings.init).abs()
    assert moved.max() > 0.02, "coefficients stayed at the init"
    assert result.coefficients.shape[0] == len(tiny_zoo.finetune_tasks)
    n_layers = 2
    expected_groups = {"task": 1, "layer": n_layers + 1}.get(granularity)
    if expected_groups:
        assert len(result.groups) == expected_groups

    # The exported recipe, merged by the export path, equals the functional merge at the learned coefficients.
    out = merge_to_dir(result.recipe, tmp_path / "merged")
    merge = FunctionalMerge(tiny_zoo.models["base"], result.sources, granularity=granularity, plus_plus=plus_plus)
    expected = merge.tensors(result.coefficients)
    exported = state_of(out)
    assert set(expected) <= set(exported)
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert Recipe.from_yaml(result.recipe.to_yaml()) == result.recipe


def test_plus_plus_keeps_only_agreeing_trimmed_entries(tiny_zoo):
    """++ by hand on one tensor: top-20% per task vector, sign of the weighted sum, agreeing entries summed."""
    from evomerge.io.model_dir import ModelDir

    sources = [tiny_zoo.models[t] for t in tiny_zoo.finetune_tasks]
    merge = FunctionalMerge(tiny_zoo.models["base"], sources, granularity="task", plus_plus=True, density=0.2)
    name = "model.layers.0.mlp.up_proj.weight"
    base = ModelDir(tiny_zoo.models["base"]).tensor(name).float()
    lam = torch.tensor([[0.2], [0.5], [0.9]])
    kept = []
    for k, s in enumerate(sources):
        delta = ModelDir(s).tensor(name).float() - base
        cut = delta.abs().flatten().kthvalue(delta.numel() - int(0.2 * delta.numel()) + 1).values
        kept.append(torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta)) * lam[k, 0])
    stacked = torch.stack(kept)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.where(stacked * sign > 0, stacked, torch.zeros_like(stacked)).sum(0)
    torch.testing.assert_close(merge.tensors(lam)[name], base + agree)


def test_init_from_a_recipe_reads_per_layer_weights(tiny_zoo):
    sources = [str(tiny_zoo.models[t]) for t in tiny_zoo.finetune_tasks]
    recipe = Recipe.model_validate({
        "merge_method": "task_arithmetic", "base_model": str(tiny_zoo.models["base"]),
        "models": [{"model": s, "parameters": {"weight": [0.1 * (k + 1), 0.5]}} for k, s in enumerate(sources)],
    })
    merge = FunctionalMerge(tiny_zoo.models["base"], sources, granularity="layer")
    init = coefficients_from_recipe(recipe, tiny_zoo.models["base"], sources, merge)
    # gradient [a, 0.5] over 2 layers: layer 0 -> a, layer 1 -> 0.5; globals take t = 0 -> a
    for k in range(3):
        a = 0.1 * (k + 1)
        assert init[k].tolist() == pytest.approx([a, a, 0.5])
    result = adamerge(tiny_zoo.models["base"], zoo_config(tiny_zoo).build_tasks(),
                      AdaMergingSettings(granularity="layer", steps=0), init=recipe, device="cpu")
    torch.testing.assert_close(result.coefficients, init)
    # a normalized merge scales each task vector by lambda * w / sum(w): lambda is not normalized away
    normalized = recipe.model_copy(update={"parameters": {"normalize": True, "lambda": 0.5}})
    init = coefficients_from_recipe(normalized, tiny_zoo.models["base"], sources, merge)
    for k in range(3):
        a = 0.1 * (k + 1)
        assert init[k].tolist() == pytest.approx([0.5 * a / 0.6, 0.5 * a / 0.6, 0.5 / 3])


def test_nan_loss_stops_with_the_last_good_coefficients(tiny_zoo, tmp_path, tasks):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_zoo.models[tiny_zoo.finetune_tasks[0]], broken)
    shard = next(broken.glob("*.safetensors"))
    state = load_file(shard)
    name = next(n for n in state if n.endswith("weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, shard, metadata={"format": "pt"})
    bad = [EntropyTask(tasks[0].name, str(broken), tasks[0].inputs), *tasks[1:]]
    result = adamerge(tiny_zoo.models["base"], bad, AdaMergingSettings(granularity="task", steps=5), device="cpu")
    assert result.stopped is not None and "step 1" in result.stopped
    assert result.losses == []
    torch.testing.assert_close(result.coefficients, torch.full((3, 1), 0.3))


def test_a_non_finite_update_stops_with_the_last_good_coefficients(tiny_zoo, tasks, monkeypatch):
    """A finite loss whose update leaves a NaN coefficient (injected at step 3) stops training at step 2's
    coefficients, which are finite and export."""
    real_step = torch.optim.Adam.step
    steps = []

    def faulty_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", faulty_step)
    result = adamerge(tiny_zoo.models["base"], tasks, AdaMergingSettings(granularity="task", steps=6), device="cpu")
    assert result.stopped == "a coefficient became non-finite at step 3; kept the coefficients of step 2"
    assert len(result.losses) == 2 and torch.isfinite(result.coefficients).all()
    assert not torch.equal(result.coefficients, torch.full((3, 1), 0.3))  # two steps were taken
    for bad in ({"init": float("nan")}, {"lr": 1e30}, {"init": 1e9}):
        with pytest.raises(ValueError):
            AdaMergingSettings(**bad)
    with pytest.raises(ValueError, match="init 2.0 is outside"):  # the clamp would pass it no gradient
        AdaMergingSettings(init=2.0)
    assert AdaMergingSettings(init=2.0, clamp=False).init == 2.0


def test_bad_inputs_are_clear_errors(tiny_zoo, tmp_path, tasks):
    cfg = zoo_config(tiny_zoo)
    data = cfg.model_dump(mode="json")
    data["tasks"][0]["where"] = {"task": "nope"}
    with pytest.raises(EvomergeError, match=r"unlabeled.jsonl: no unlabeled rows for task 'copy'"):
        AdaMergingConfig.model_validate(data).build_tasks()
    from evomerge.adamerging.export import adamerge_to_dir

    with pytest.raises(EvomergeError, match="--device 'tpu': use cpu, cuda or cuda:N"):
        adamerge_to_dir(cfg, tmp_path / "out", device="tpu")
    # unlabeled inputs that are blank, not text, or of a shape the model cannot take
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "ab", "task": "copy"}\n{"prompt": "", "task": "copy"}\n')
    data = cfg.model_dump(mode="json")
    data["tasks"][0]["unlabeled"] = str(blank)
    with pytest.raises(EvomergeError, match=r"blank.jsonl: the 'prompt' of row 2 of task 'copy' is '', not a non-empty"):
        AdaMergingConfig.model_validate(data).build_tasks()
    blank.write_bytes(b'{"prompt": "\xff\xfe", "task": "copy"}\n')
    with pytest.raises(EvomergeError, match="blank.jsonl: not a text file"):
        AdaMergingConfig.model_validate(data).build_tasks()
    wide = [EntropyTask(t.name, t.source, {**t.inputs, "input_ids": t.inputs["input_ids"][:, None]}) for t in tasks]
    with pytest.raises(EvomergeError, match="the model cannot run on the tasks' unlabeled inputs"):
        adamerge(tiny_zoo.models["base"], wide, AdaMergingSettings(steps=1), device="cpu")
    data = cfg.model_dump(mode="json")
    data["tasks"][0]["head"] = ["no_such_tensor"]
    with pytest.raises(EvomergeError, match="no tensor starts with head prefix no_such_tensor"):
        AdaMergingConfig.model_validate(data).build_tasks()
    # heads of the wrong shape for the base model
    name = "model.norm.weight"
    bad = [EntropyTask(t.name, t.source, t.inputs, {name: torch.ones(7)}) for t in tasks]
    with pytest.raises(EvomergeError, match=r"head tensor 'model.norm.weight' has shape \[7\]"):
        adamerge(tiny_zoo.models["base"], bad, AdaMergingSettings(steps=1), device="cpu")
    # a source of another architecture
    with pytest.raises(EvomergeError, match="tensor 'model.embed_tokens.weight' has shape"):
        FunctionalMerge(tiny_zoo.models["base"], [_resized_copy(tiny_zoo, tmp_path)], granularity="task")
    # one model in two tasks (its task vector counted twice); text prompts for a base without a tokenizer
    data = cfg.model_dump(mode="json")
    data["tasks"][1].update(model=data["tasks"][0]["model"], name="again")
    with pytest.raises(EvomergeError, match=r"tasks\[1\] and tasks\[0\] both merge .*; give each model one task"):
        AdaMergingConfig.model_validate(data).build_tasks()
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_zoo.models["base"].iterdir():
        if f.name == "config.json" or f.name.endswith((".safetensors", ".json")) and "token" not in f.name:
            shutil.copy(f, bare / f.name)
    data = {**cfg.model_dump(mode="json"), "base_model": str(bare)}
    with pytest.raises(EvomergeError, match=r"tasks\[0\]\.unlabeled .*unlabeled.jsonl holds text prompts, but the base "
                                            rf"model {bare} has no tokenizer"):
        AdaMergingConfig.model_validate(data).build_tasks()
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base_model: {tiny_zoo.models['base']}\ntasks: []\ngranularity: row\n")
    with pytest.raises(EvomergeError, match=r"cfg.yaml: line \d+: (tasks|granularity)"):
        AdaMergingConfig.from_file(path)


def _resized_copy(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(zoo.models[zoo.finetune_tasks[0]], other)
    shard = next(f for f in other.glob("*.safetensors") if "model.embed_tokens.weight" in load_file(f))
    state = load_file(shard)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1].clone()
    save_file(state, shard, metadata={"format": "pt"})
    return str(other)


def test_cli_writes_model_and_report_and_refuses_to_overwrite(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "ada.yaml"
    lines = [f"base_model: {tiny_zoo.models['base']}", "tasks:"]
    for t in tiny_zoo.finetune_tasks:
        lines += [f"  - model: {tiny_zoo.models[t]}", f"    unlabeled: {tiny_zoo.tasks_dir / 'unlabeled.jsonl'}",
                  f"    where: {{task: {t}}}"]
    cfg.write_text("\n".join(lines) + "\nsteps: 10\n")
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "evomerge.cli", "adamerge", str(cfg), str(out), "--granularity", "task", "--lr", "0.01"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "adamerging.json").read_text())
    assert report["settings"]["granularity"] == "task" and len(report["losses"]) == 10
    assert report["entropy"]["final"] < report["entropy"]["initial"]
    assert "task-wise AdaMerging" in done.stdout and "entropy per task" in done.stdout
    AutoModelForCausalLM.from_pretrained(out)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    # --force replaces the model, never the unlabeled data it trained on
    data = out / "unlabeled.jsonl"
    shutil.copy(tiny_zoo.tasks_dir / "unlabeled.jsonl", data)
    cfg.write_text(cfg.read_text().replace(str(tiny_zoo.tasks_dir / "unlabeled.jsonl"), str(data)))
    forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 2 and "an input of this command" in forced.stderr and data.exists()

"""`evomerge merge` end to end on the tiny zoo: equality with the kernels, layouts, bad input."""

import json
import shutil
import struct

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.arch import arch_for
from evomerge.errors import EvomergeError
from evomerge.io.model_dir import ModelDir
from evomerge.materialize.export import merge_to_dir
from evomerge.methods.registry import apply_method
from evomerge.recipe import Recipe


def state(path):
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def recipe(data):
    return Recipe.model_validate(data)


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    m = tiny_zoo.models
    return {name: str(p) for name, p in m.items()}


@pytest.mark.parametrize(
    "method,params,global_params",
    [
        ("ties", {"weight": 0.8, "density": 0.4}, {"lambda": 0.7}),
        ("task_arithmetic", {"weight": 0.5}, {}),
        ("dare_ties", {"weight": 1.0, "density": 0.5}, {}),
        ("breadcrumbs", {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {}),
        ("della_linear", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
        ("model_stock", {}, {}),
    ],
)
def test_merge_equals_kernel_on_every_tensor(zoo, tiny_zoo, tmp_path, method, params, global_params):
    fts = tiny_zoo.finetune_tasks
    r = recipe({"merge_method": method, "base_model": zoo["base"], "parameters": global_params,
                "models": [{"model": zoo[f], "parameters": params} for f in fts]})
    out = merge_to_dir(r, tmp_path / "m", threads=2, seed=5)
    merged = state(out)
    base = state(tiny_zoo.models["base"])
    srcs = [state(tiny_zoo.models[f]) for f in fts]
    assert merged.keys() == base.keys()
    from evomerge.materialize.export import job_seed

    for k in base:
        gen = torch.Generator().manual_seed(job_seed(5, k))
        ref = apply_method(method, base[k], [s[k] for s in srcs], [params] * len(fts), global_params, gen)
        assert torch.equal(merged[k], ref), k
    again = merge_to_dir(r, tmp_path / "m2", threads=1, seed=5)
    assert all(torch.equal(merged[k], v) for k, v in state(again).items())


def test_merged_model_loads_and_generates(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = recipe({"merge_method": "task_arithmetic", "base_model": zoo["base"], "parameters": {"lambda": 0.3},
                "models": [{"model": zoo[f], "parameters": {"weight": 1.0}} for f in ("copy", "rev", "sort")],
                "out_dtype": "bfloat16"})
    out = merge_to_dir(r, tmp_path / "m", max_shard_size="60KB")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and zoo["rev"] in card
    assert Recipe.from_yaml((out / "mergekit_config.yml").read_text()) == r
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("rev:ab=", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_frankenmerge_renumbers_layers_and_sets_count(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    r = recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": zoo["base"], "layer_range": [0, 2]}]},
        {"sources": [{"model": zoo["rev"], "layer_range": [1, 2]}]},
        {"sources": [{"model": zoo["sort"], "layer_range": [0, 1], "parameters": {"scale": 0.5}}]},
    ]})
    out = merge_to_dir(r, tmp_path / "f")
    merged, base = state(out), state(ModelDir(zoo["base"]).path)
    rev, sort = state(ModelDir(zoo["rev"]).path), state(ModelDir(zoo["sort"]).path)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(merged[name.format(1)], base[name.format(1)])
    assert torch.equal(merged[name.format(2)], rev[name.format(1)])
    assert torch.equal(merged[name.format(3)], sort[name.format(0)] * 0.5)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # post-layer tensors come from the last slice, with its parameters (as in mergekit)
    assert torch.equal(merged["lm_head.weight"], sort["lm_head.weight"] * 0.5)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(model.model.layers) == 4
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)


def test_gradient_and_filter_parameters_per_layer(zoo, tmp_path):
    # weight goes 0 -> 1 over the 2 layers; self_attn tensors are pinned to 0
    r = recipe({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                "models": [{"model": zoo["rev"], "parameters": {
                    "weight": [{"filter": "self_attn", "value": 0.0}, {"value": [0.0, 1.0]}]}}]})
    merged, base, rev = state(merge_to_dir(r, tmp_path / "g")), state(ModelDir(zoo["base"]).path), state(ModelDir(zoo["rev"]).path)
    mlp, attn = "model.layers.{}.mlp.down_proj.weight", "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(merged[mlp.format(0)], base[mlp.format(0)])
    torch.testing.assert_close(merged[mlp.format(1)], rev[mlp.format(1)])  # base + (rev - base)
    assert torch.equal(merged[attn.format(1)], base[attn.format(1)])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])  # global tensors take t = 0


def test_cli_merge_refuses_overwrite_and_forces(zoo, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": zoo["rev"], "parameters": {"weight": 1.0}}, {"model": zoo["sort"], "parameters": {"weight": 1.0}}]}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evomerge.cli", "merge", str(cfg), str(out)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    (out / "marker").write_text("keep")
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 2 and "already exists" in second.stderr and (out / "marker").exists()
    assert subprocess.run(cmd + ["--force"], capture_output=True).returncode == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").exists()


def test_planning_a_merge_of_whole_models_does_not_import_transformers(zoo):
    """Only stacks (slices) read configs through transformers: its second of imports was 40% of a
    medium-zoo merge."""
    import subprocess
    import sys

    code = ("import sys; from evomerge.recipe import Recipe; from evomerge.materialize.plan import open_models, plan_merge; "
            f"r = Recipe.model_validate({{'merge_method': 'ties', 'base_model': {str(zoo['base'])!r}, "
            f"'models': [{{'model': {str(zoo['rev'])!r}, 'parameters': {{'weight': 1.0, 'density': 0.5}}}}]}}); "
            "plan = plan_merge(r, open_models(r)); print(len(plan.jobs), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    jobs, imported = out.stdout.split()
    assert int(jobs) > 0 and imported == "False"


def test_ctrl_c_during_a_merge_says_the_output_is_untouched(zoo, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import evomerge.materialize.export as export
    from evomerge.cli import app

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": zoo["rev"], "parameters": {"weight": 1.0}}, {"model": zoo["sort"], "parameters": {"weight": 1.0}}]}))
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["merge", str(cfg), str(out)]).exit_code == 0
    (out / "marker").write_text("keep")
    before = sorted(p.name for p in out.iterdir())
    real, calls = export.run_job, []

    def interrupted(*args, **kwargs):  # the user's Ctrl-C, injected on the third tensor
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "run_job", interrupted)
    result = CliRunner().invoke(app, ["merge", str(cfg), str(out), "--force", "--threads", "1"])
    assert result.exit_code == 130 and len(calls) == 3
    assert f"interrupted: nothing was written to {out} (it is as it was)" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "out"]  # no temp directory left
    assert sorted(p.name for p in out.iterdir()) == before


# -- bad input -----------------------------------------------------------------
def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_shape_mismatch_names_tensor_and_shapes(zoo, tmp_path):
    bad = _copy_model(zoo["rev"], tmp_path / "bad")
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.ones(7)
            save_file(tensors, str(shard), {"format": "pt"})
    r = recipe({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                "models": [{"model": str(bad), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    with pytest.raises(EvomergeError, match=r"shape mismatch for model.norm.weight: ") as err:
        merge_to_dir(r, out)
    assert f"{bad}:model.norm.weight [7]" in str(err.value) and "base:model.norm.weight [64]" in str(err.value)
    assert not out.exists()


def test_truncated_shard_names_the_file(zoo, tmp_path):
    bad = _copy_model(zoo["rev"], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(EvomergeError, match=f"{shard.name}: truncated"):
        ModelDir(bad)
    shard.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(EvomergeError, match=f"{shard.name}: not a readable safetensors file"):
        ModelDir(bad)


def _drop_tensors(model, names):
    """Remove ``names`` from a copied model's shards and index."""
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    for victim in names:
        shard = model / data["weight_map"].pop(victim)
        tensors = load_file(str(shard))
        del tensors[victim]
        save_file(tensors, str(shard), {"format": "pt"})
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("role", ["source", "base"])
def test_missing_tensor_and_missing_model(zoo, tmp_path, role):
    bad = _copy_model(zoo["rev"], tmp_path / "bad")
    victim = "model.layers.1.mlp.up_proj.weight"
    _drop_tensors(bad, [victim])
    base, source = (zoo["base"], str(bad)) if role == "source" else (str(bad), zoo["sort"])
    r = recipe({"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": source, "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match=f"tensor '{victim}' is missing from {bad}"):
        merge_to_dir(r, tmp_path / "out")
    # a layer the config counts but the weights lack
    layer = [n for n in ModelDir(bad).names if n.startswith("model.layers.1.")]
    _drop_tensors(bad, layer)
    with pytest.raises(EvomergeError, match=f"layer 1 of {bad} has no tensors, though its config.json gives it 2"):
        merge_to_dir(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    r = recipe({"merge_method": "linear", "models": [{"model": "org/not-here", "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match="org/not-here: model directory not found .*does not download"):
        merge_to_dir(r, tmp_path / "out")


def _break_index(model):
    (model / "model.safetensors.index.json").write_text('{"weight_map": 5}')


def _break_config(model, value):
    (model / "config.json").write_text(json.dumps(value))


def _break_header(model):
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(struct.pack("<Q", 7) + b"[1,2,3]" + shard.read_bytes()[8:])


@pytest.mark.parametrize("damage,match", [
    (_break_index, "invalid safetensors index"),
    (lambda m: _break_config(m, [1, 2]), "config.json: not a model config"),
    (lambda m: _break_config(m, {**json.loads((m / "config.json").read_text()), "num_hidden_layers": "two"}),
     "num_hidden_layers is 'two', not a layer count"),
    (_break_header, "its header is not a JSON object"),
])
def test_damaged_model_files_are_named(zoo, tmp_path, damage, match):
    bad = _copy_model(zoo["rev"], tmp_path / "bad")
    damage(bad)
    r = recipe({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                "models": [{"model": str(bad), "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match=match):
        merge_to_dir(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_inputs_and_devices_are_named(zoo, tmp_path):
    binary = tmp_path / "cfg.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    with pytest.raises(EvomergeError, match="cfg.yaml: not a text file"):
        Recipe.from_file(binary)
    r = recipe({"merge_method": "linear", "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match="--device 'bogus': use cpu, cuda or cuda:N"):
        merge_to_dir(r, tmp_path / "out", device="bogus")
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(ModelDir(zoo["rev"]).path / "config.json", pk / "config.json")
    (pk / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EvomergeError, match="pytorch_model.bin: not a readable checkpoint"):
        ModelDir(pk, allow_pickle=True)


def test_models_of_other_depths_are_named(zoo, tmp_path):
    shallow = _copy_model(zoo["rev"], tmp_path / "shallow")
    _drop_tensors(shallow, [n for n in ModelDir(shallow).names if n.startswith("model.layers.1.")])
    _break_config(shallow, {**json.loads((shallow / "config.json").read_text()), "num_hidden_layers": 1})
    r = recipe({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                "models": [{"model": str(shallow), "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match=rf"different layer counts \({shallow} has 1, {zoo['base']} has 2\); "
                                            "merge them layer by layer with slices"):
        merge_to_dir(r, tmp_path / "out")


def test_pickle_checkpoints_need_opt_in(zoo, tmp_path):
    src = ModelDir(zoo["base"])
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(src.path / "config.json", pk / "config.json")
    torch.save({n: src.tensor(n).clone() for n in src.names}, pk / "pytorch_model.bin")
    with pytest.raises(EvomergeError, match="pickle checkpoints .*--allow-pickle"):
        ModelDir(pk)
    opened = ModelDir(pk, allow_pickle=True)
    assert torch.equal(opened.tensor("lm_head.weight"), src.tensor("lm_head.weight"))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"merge_method": "tiez"}, "unknown merge_method 'tiez'"),
        ({"parameters": {"densty": 0.5}}, "ties has no parameter 'densty'; valid: density"),
        ({"parameters": {"density": 1.5}}, "density 1.5 .* outside \\[0, 1\\]"),
        ({"base_model": None}, "ties needs a base_model"),
        ({"merge_method": "dare_ties", "parameters": {"rescale_method": "l2"}}, "rescale_method 'l2'; choose one of l1, inverse_density"),
        ({"merge_method": "della", "parameters": {"density": 0.5, "epsilon": 0.6}},
         "della needs 0 < density - epsilon and density \\+ epsilon < 1; .* has density 0.5, epsilon 0.6"),
        ({"merge_method": "breadcrumbs", "parameters": {"density": 0.5, "gamma": 2}}, "gamma 2 for .* is outside \\[0, 1\\)"),
    ],
)
def test_bad_parameters_fail_before_writing(zoo, tmp_path, change, match):
    data = {"merge_method": "ties", "base_model": zoo["base"],
            "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0}}]}
    data.update(change)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("x")
    with pytest.raises(EvomergeError, match=match):
        merge_to_dir(recipe(data), out, force=True)
    assert (out / "precious").read_text() == "x"


@pytest.mark.parametrize("value,match", [("abc", "parameter 'weight' must be a number, got 'abc'"),
                                         (float("nan"), "parameter 'weight' must be a finite number, got nan"),
                                         (float("inf"), "parameter 'weight' must be a finite number, got inf")])
def test_parameters_are_finite_numbers(zoo, tmp_path, value, match):
    data = {"merge_method": "ties", "base_model": zoo["base"],
            "models": [{"model": zoo["rev"], "parameters": {"weight": value, "density": 0.5}}]}
    with pytest.raises(EvomergeError, match=match):
        merge_to_dir(recipe(data), tmp_path / "out")
    # YAML reads 3e-1 (no dot) as a string: it is the number it spells
    spelled = yaml.safe_load("weight: 3e-1")
    assert spelled["weight"] == "3e-1"
    merge_to_dir(recipe({**data, "models": [{"model": zoo["rev"], "parameters": {**spelled, "density": 0.5}}]}),
                 tmp_path / "spelled")
    merge_to_dir(recipe({**data, "models": [{"model": zoo["rev"], "parameters": {"weight": 0.3, "density": 0.5}}]}),
                 tmp_path / "number")
    assert state(tmp_path / "spelled").keys() == state(tmp_path / "number").keys()
    assert all(torch.equal(a, state(tmp_path / "number")[k]) for k, a in state(tmp_path / "spelled").items())


def test_force_never_replaces_inputs_or_foreign_directories(zoo, tmp_path):
    """--force swaps a model directory; one holding the config or a source, a non-model folder or a file
    is refused and left as it was."""
    models = tmp_path / "models"
    source = _copy_model(zoo["rev"], models / "rev")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(source), "parameters": {"weight": 1.0}}]}))
    r = Recipe.from_file(cfg)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    (tmp_path / "file.txt").write_text("keep")
    for out, match in [(models, "holds .*rev, an input of this command"), (source, "holds .*rev, an input"),
                       (tmp_path, "holds .*cfg.yaml, an input"), (folder, "not a model directory"),
                       (tmp_path / "file.txt", "not a directory")]:
        with pytest.raises(EvomergeError, match=match):
            merge_to_dir(r, out, force=True, inputs=[cfg])
    assert (folder / "notes.txt").read_text() == "keep" and (tmp_path / "file.txt").read_text() == "keep"
    assert ModelDir(source).names and cfg.exists()


def test_the_saved_recipe_reproduces_from_any_directory(zoo, tmp_path):
    models = tmp_path / "models"
    for name in ("base", "rev"):
        _copy_model(zoo[name], models / name)
    relative = recipe({"merge_method": "ties", "base_model": "base",
                       "models": [{"model": "rev", "parameters": {"weight": 0.7, "density": 0.5}}]})
    merge_to_dir(relative, tmp_path / "first", recipe_dir=models)
    saved = Recipe.from_file(tmp_path / "first" / "mergekit_config.yml")
    assert saved.referenced_models() == [str((models / "base").resolve()), str((models / "rev").resolve())]
    merge_to_dir(saved, tmp_path / "again")
    first, again = state(tmp_path / "first"), state(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_zoo_references_merge_and_stay_in_the_saved_recipe(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_zoo.path, tmp_path / "cache" / "zoo" / "lm-tiny-seed0")  # the cache's copy: no build
    by_ref = recipe({"merge_method": "ties", "base_model": "zoo:lm/tiny/base",
                     "models": [{"model": "zoo:lm/tiny/rev", "parameters": {"weight": 0.7, "density": 0.5}}]})
    merge_to_dir(by_ref, tmp_path / "out")
    assert Recipe.from_file(tmp_path / "out" / "mergekit_config.yml") == by_ref
    by_path = by_ref.with_models({"zoo:lm/tiny/base": str(tiny_zoo.models["base"]),
                                  "zoo:lm/tiny/rev": str(tiny_zoo.models["rev"])})
    merge_to_dir(by_path, tmp_path / "paths")
    a, b = state(tmp_path / "out"), state(tmp_path / "paths")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_source_must_hold_a_tokenizer(zoo, tmp_path):
    data = {"merge_method": "linear", "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0}},
                                                 {"model": zoo["sort"], "parameters": {"weight": 1.0}}]}
    merge_to_dir(recipe({**data, "tokenizer_source": zoo["sort"]}), tmp_path / "named")
    assert (tmp_path / "named" / "tokenizer.json").read_bytes() == (ModelDir(zoo["sort"]).path / "tokenizer.json").read_bytes()
    bare = _copy_model(zoo["sort"], tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(EvomergeError, match=f"tokenizer_source '{bare}': {bare} holds no tokenizer"):
        merge_to_dir(recipe({**data, "tokenizer_source": str(bare)}), tmp_path / "out")
    union = {"merge_method": "linear", "tokenizer_source": "union",
             "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0}}, {"model": str(bare), "parameters": {"weight": 1.0}}]}
    with pytest.raises(EvomergeError, match=f"union: {bare} has no tokenizer.json"):
        merge_to_dir(recipe(union), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a tokenizer source of its own, named relative to the recipe: saved absolute, so the recipe written
    # with the model rebuilds it from anywhere; and never replaced by the output
    own = _copy_model(zoo["sort"], tmp_path / "recipes" / "tok")
    merge_to_dir(recipe({**data, "tokenizer_source": "tok"}), tmp_path / "rel", recipe_dir=tmp_path / "recipes")
    saved = Recipe.from_file(tmp_path / "rel" / "mergekit_config.yml")
    assert saved.tokenizer_source == str(own.resolve())
    with pytest.raises(EvomergeError, match="an input of this command"):
        merge_to_dir(recipe({**data, "tokenizer_source": str(own)}), own, force=True)
    assert ModelDir(own).names


def test_a_write_killed_midway_leaves_nothing_for_long(zoo, tmp_path):
    """A merge killed while writing leaves its temp directory behind; the next write next to it removes
    it, but never the temp directory of a process that still runs."""
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    abandoned = tmp_path / f".out.tmp-{gone.pid}-abc"  # named as atomic_dir names it
    abandoned.mkdir()
    (abandoned / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    running = tmp_path / f".out.tmp-{os.getpid()}-def"  # this process is alive
    running.mkdir()
    r = recipe({"merge_method": "ties", "base_model": zoo["base"],
                "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0, "density": 0.5}}]})
    merge_to_dir(r, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()
    assert not abandoned.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name])


def test_an_output_made_by_another_process_meanwhile_is_kept(zoo, tmp_path):
    r = recipe({"merge_method": "ties", "base_model": zoo["base"],
                "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0, "density": 0.5}}]})
    out = tmp_path / "out"

    def other_writer(tmp):  # another merge to the same OUT_DIR finishes first
        out.mkdir()
        (out / "theirs").write_text("kept")

    with pytest.raises(EvomergeError, match=r"out: was created by something else while this output was being "
                                            r"written; nothing was replaced. Pass --force"):
        merge_to_dir(r, out, finalize=other_writer)
    assert [p.name for p in out.iterdir()] == ["theirs"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_layer_range_beyond_the_model(zoo, tmp_path):
    r = recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": zoo["base"], "layer_range": [0, 5]}]}]})
    with pytest.raises(EvomergeError, match=r"layer_range \[0, 5\] .* exceeds its 2 layers"):
        merge_to_dir(r, tmp_path / "out")


def test_arch_maps_for_gpt2_and_inferred_families():
    gpt2 = arch_for({"model_type": "gpt2", "n_layer": 12})
    assert gpt2.layer_of("transformer.h.11.attn.c_attn.weight") == 11
    assert gpt2.layer_of("transformer.wte.weight") is None and gpt2.is_pre("transformer.wte.weight")
    assert gpt2.layer_name(3, "mlp.c_fc.weight") == "transformer.h.3.mlp.c_fc.weight"
    assert gpt2.with_num_layers({"n_layer": 12}, 20)["n_layer"] == 20
    qwen = arch_for({"model_type": "qwen2", "num_hidden_layers": 2, "layer_types": ["full", "sliding"]})
    assert qwen.with_num_layers({"num_hidden_layers": 2, "layer_types": ["full", "sliding"]}, 3)["layer_types"] == ["full", "sliding", "full"]
    # any per-layer list (SmolLM3's no_rope_layers), following its source layers in a stack
    smol = {"num_hidden_layers": 2, "no_rope_layers": [1, 0], "architectures": ["X"]}
    other = {"num_hidden_layers": 3, "no_rope_layers": [0, 0, 1]}
    stacked = qwen.with_layers(smol, [(smol, 1), (other, 2), (smol, 0)])
    assert stacked["no_rope_layers"] == [0, 1, 1] and stacked["num_hidden_layers"] == 3 and stacked["architectures"] == ["X"]
    guessed = arch_for({"model_type": "newthing", "num_layers": 4}, ["backbone.blocks.0.w", "head.w"])
    assert guessed.layer_of("backbone.blocks.3.w") == 3 and guessed.num_layers({"num_layers": 4}) == 4
    with pytest.raises(EvomergeError, match="cannot tell which tensors are per-layer"):
        arch_for({"model_type": "newthing"}, ["a.w", "b.w"])


@pytest.mark.parametrize("value", ["maybe", 2, "nope", 0.5])
def test_flags_must_be_booleans(zoo, tmp_path, value):
    data = {"merge_method": "ties", "base_model": zoo["base"], "parameters": {"normalize": value},
            "models": [{"model": zoo["rev"], "parameters": {"weight": 0.5, "density": 0.5}}]}
    with pytest.raises(EvomergeError, match=f"parameter 'normalize' must be true or false, got {value!r}"):
        merge_to_dir(recipe(data), tmp_path / "out")


def test_flags_spelled_as_strings_mean_what_they_say(zoo, tmp_path):
    """``normalize: "false"`` is false (as mergekit's pydantic reads it), not a truthy string."""
    data = {"merge_method": "ties", "base_model": zoo["base"],
            "models": [{"model": zoo["rev"], "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": zoo["sort"], "parameters": {"weight": 0.25, "density": 0.5}}]}
    outs = {}
    for label, flag in [("string", "false"), ("bool", False), ("true", True)]:
        outs[label] = state(merge_to_dir(recipe({**data, "parameters": {"normalize": flag}}), tmp_path / label))
    assert all(torch.equal(a, outs["bool"][k]) for k, a in outs["string"].items())
    assert not all(torch.equal(a, outs["true"][k]) for k, a in outs["string"].items())


def test_frankenmerge_of_models_of_other_widths_is_refused(zoo, tmp_path):
    """Layers of a narrower model stacked under the base's config would write a model it cannot load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(zoo["base"])
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    narrow = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(config).save_pretrained(narrow)
    r = recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": zoo["base"], "layer_range": [0, 1]}]},
        {"sources": [{"model": str(narrow), "layer_range": [1, 2]}]}]})
    with pytest.raises(EvomergeError, match=r"output tensor model\.layers\.1\.\S+ would come from model\.layers\.1\.\S+ "
                                            rf"of {narrow}, shape \[\d+(, \d+)?\], but the output takes its config "
                                            rf"from {zoo['base']}, which has \[\d+(, \d+)?\] there"):
        merge_to_dir(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_listed_twice_is_refused(zoo):
    """mergekit keys its inputs by model and would merge a repeated one once; evomerge would count it twice."""
    twice = {"merge_method": "linear", "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0}},
                                                  {"model": zoo["sort"], "parameters": {"weight": 1.0}},
                                                  {"model": zoo["rev"], "parameters": {"weight": 2.0}}]}
    with pytest.raises(EvomergeError, match=rf"cfg.yaml: .*models\[2\]: {zoo['rev']} is already models\[0\]"):
        Recipe.from_yaml(yaml.safe_dump(twice), "cfg.yaml")
    sliced = {"merge_method": "linear", "slices": [{"sources": [
        {"model": zoo["rev"], "layer_range": [0, 2], "parameters": {"weight": 1.0}},
        {"model": zoo["rev"], "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]}
    with pytest.raises(EvomergeError, match=rf"sources\[1\]: {zoo['rev']} is already sources\[0\]"):
        Recipe.from_yaml(yaml.safe_dump(sliced), "cfg.yaml")


def test_non_finite_merges_are_named_not_written(zoo, tmp_path):
    bad = _copy_model(zoo["rev"], tmp_path / "bad")
    victim = "model.layers.1.mlp.down_proj.weight"
    shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][victim]
    tensors = load_file(str(shard))
    tensors[victim][0, 0] = float("nan")
    save_file(tensors, str(shard), {"format": "pt"})
    data = {"merge_method": "task_arithmetic", "base_model": zoo["base"],
            "models": [{"model": str(bad), "parameters": {"weight": 0.5}}]}
    with pytest.raises(EvomergeError, match=rf"{victim}: the merged tensor holds NaN or Inf values \(non-finite values "
                                            rf"in {bad}:{victim}\)"):
        merge_to_dir(recipe(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # finite inputs that overflow the output dtype
    data = {**data, "models": [{"model": zoo["rev"], "parameters": {"weight": 1e30}}], "out_dtype": "float16"}
    with pytest.raises(EvomergeError, match=r"the merged tensor holds NaN or Inf values \(the inputs are finite: "
                                            r"the merge overflows float16\)"):
        merge_to_dir(recipe(data), tmp_path / "out")


def test_a_model_tying_its_head_lends_its_embeddings(zoo, tmp_path):
    """A fine-tune saved with tied embeddings has no lm_head.weight: its embeddings stand in (mergekit's tied_names)."""
    tied = _copy_model(zoo["rev"], tmp_path / "tied")
    _drop_tensors(tied, ["lm_head.weight"])
    _break_config(tied, {**json.loads((tied / "config.json").read_text()), "tie_word_embeddings": True})
    r = recipe({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                "models": [{"model": str(tied), "parameters": {"weight": 0.5}}]})
    out = state(merge_to_dir(r, tmp_path / "out"))
    base, embed = ModelDir(zoo["base"]).tensor("lm_head.weight"), ModelDir(tied).tensor("model.embed_tokens.weight")
    assert torch.equal(out["lm_head.weight"], ((embed.float() - base.float()) * 0.5 + base.float()).to(base.dtype))
    # a tied base: its embeddings are the base of the head's merge, and the output keeps the merged head untied
    r = recipe({"merge_method": "task_arithmetic", "base_model": str(tied),
                "models": [{"model": zoo["sort"], "parameters": {"weight": 1.0}}]})
    out2 = merge_to_dir(r, tmp_path / "out2")
    assert "lm_head.weight" in state(out2)
    assert json.loads((out2 / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_full_disk_is_named_and_leaves_nothing(zoo, tmp_path, monkeypatch):
    import errno
    import os

    from evomerge.io import writer

    real = os.pwrite

    def full(fd, data, offset):
        if isinstance(data, memoryview):  # tensor data; the shard headers went through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    r = recipe({"merge_method": "linear", "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0}},
                                                     {"model": zoo["sort"], "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match=r"model(-\d+-of-\d+)?\.safetensors: cannot write \S+ \(No space left on device\)"):
        merge_to_dir(r, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_models_of_different_architectures_are_refused(zoo, tmp_path):
    """Same tensor names, other family (Mistral's layers under a Llama config): refused, naming both types."""
    other = _copy_model(zoo["rev"], tmp_path / "mistral")
    _break_config(other, {**json.loads((other / "config.json").read_text()), "model_type": "mistral",
                          "architectures": ["MistralForCausalLM"]})
    for data in ({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                  "models": [{"model": str(other), "parameters": {"weight": 1.0}}]},
                 {"merge_method": "passthrough", "slices": [{"sources": [{"model": zoo["base"], "layer_range": [0, 1]}]},
                                                            {"sources": [{"model": str(other), "layer_range": [1, 2]}]}]}):
        with pytest.raises(EvomergeError, match=rf"models of different architectures \({zoo['base']} is 'llama', "
                                                rf"{other} is 'mistral'\)"):
            merge_to_dir(recipe(data), tmp_path / "out")


def test_the_saved_recipe_carries_the_seed_its_masks_were_drawn_with(zoo, tmp_path):
    from evomerge.io.writer import parse_size

    data = {"merge_method": "dare_ties", "base_model": zoo["base"], "random_seed": 5,
            "models": [{"model": zoo["rev"], "parameters": {"weight": 1.0, "density": 0.5}}]}
    merge_to_dir(recipe(data), tmp_path / "a", seed=3)  # --seed overrides the recipe's
    saved = Recipe.from_file(tmp_path / "a" / "mergekit_config.yml")
    assert saved.random_seed == 3
    merge_to_dir(saved, tmp_path / "again")
    a, again = state(tmp_path / "a"), state(tmp_path / "again")
    assert all(torch.equal(a[k], again[k]) for k in a)
    merge_to_dir(recipe(data), tmp_path / "five")
    assert not all(torch.equal(a[k], v) for k, v in state(tmp_path / "five").items())  # another seed, other masks
    with pytest.raises(EvomergeError, match="a shard holds at least one byte"):
        parse_size("0")

"""Search spaces: validation with clear errors, and genome -> recipe decoding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import interpolate
from evomerge.spaces.space import SearchSpace
from search_helpers import tiny_space


def load(path):
    return SearchSpace.from_file(path).resolved()


def test_parameter_genome_layout_and_decode(tiny_zoo, tmp_path):
    space = load(tiny_space(tiny_zoo, tmp_path, genome={
        "type": "parameter", "method": "dare_ties", "layer_groups": 2,
        "genes": {"weight": [0.0, 2.0], "density": [0.2, 0.6]}, "parameters": {"lambda": 0.9},
    }))
    genome = space.build_genome()
    assert genome.names[:4] == ["copy.weight[g0]", "copy.weight[g1]", "copy.density[g0]", "copy.density[g1]"]
    assert genome.dim == 3 * 2 * 2
    rng = np.random.default_rng(1)
    x = rng.uniform(size=genome.dim)
    recipe = genome.decode(x)
    assert recipe.merge_method == "dare_ties" and recipe.base_model == space.models.base
    assert recipe.parameters["lambda"] == 0.9 and recipe.random_seed == space.seed
    rev = recipe.models[1].parameters
    # each layer's value (mergekit gradient semantics) is its group's gene value, in the gene's units
    per_layer = [interpolate(rev["weight"], i / (genome.num_layers - 1)) for i in range(genome.num_layers)]
    assert per_layer == pytest.approx([2.0 * x[4], 2.0 * x[5]])
    assert interpolate(rev["density"], 0.0) == pytest.approx(0.2 + 0.4 * x[6])
    assert genome.decode(x) == recipe  # pure


def test_default_genes_follow_the_method(tiny_zoo, tmp_path):
    ta = load(tiny_space(tiny_zoo, tmp_path, genome={"type": "parameter", "method": "task_arithmetic"}))
    assert ta.build_genome().names == ["copy.weight", "rev.weight", "sort.weight"]
    path = tiny_space(tiny_zoo, tmp_path, name="slerp", genome={"type": "parameter", "method": "slerp"})
    data = yaml.safe_load(path.read_text())
    data["models"]["sources"] = data["models"]["sources"][:1]
    path.write_text(yaml.safe_dump(data))
    genome = load(path).build_genome()
    assert genome.names == ["t"]
    assert genome.decode(np.array([0.25])).parameters["t"] == 0.25


@pytest.mark.parametrize("genome, message", [
    ({"type": "parameter", "method": "ties", "genes": {"density": [0.5, 0.2]}}, "bounds [0.5, 0.2] are empty"),
    ({"type": "parameter", "method": "ties", "genes": {"density": [0.0, 1.5]}}, "leave the valid range"),
    ({"type": "parameter", "method": "ties", "genes": {"t": [0, 1]}}, "ties has no parameter 't'"),
    ({"type": "parameter", "method": "model_stock"}, "cannot be searched"),
    ({"type": "parameter", "method": "ties", "layer_groups": 9}, "exceeds the models' 2 layers"),
    ({"type": "parameter", "method": "ties", "genes": {"weight": [0, float("inf")]}}, "must be finite numbers"),
    ({"type": "parameter", "method": "ties", "genes": {}}, "genes: none to search"),
    ({"type": "parameter", "method": "ties", "parameters": {"normalise": False}}, "ties has no parameter 'normalise'"),
    ({"type": "parameter", "method": "della", "genes": {"density": [0.1, 0.9]}},
     "with epsilon up to 0.15, density bounds [0.1, 0.9] reach outside (0.15, 0.85)"),
    ({"type": "parameter", "method": "della", "genes": {"density": [0.3, 0.6], "epsilon": [0, 0.4]}},
     "with epsilon up to 0.4, density bounds [0.3, 0.6] reach outside"),
    ({"type": "parameter", "method": "ties", "layer_groups": True}, "Input should be a valid integer"),
    ({"type": "dataflow", "scale_bounds": [0, 1]}, "scales must be positive"),
])
def test_bad_genomes_are_named(tiny_zoo, tmp_path, genome, message):
    with pytest.raises(EvomergeError, match=re.escape(message)):
        load(tiny_space(tiny_zoo, tmp_path, genome=genome)).build_genome()


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_density_defaults_fit_its_epsilon(tiny_zoo, tmp_path, method):
    """DELLA needs 0 < density - epsilon and density + epsilon < 1: the default density bounds keep every
    candidate inside, so none fails for a setting the space chose."""
    genome = load(tiny_space(tiny_zoo, tmp_path, genome={"type": "parameter", "method": method})).build_genome()
    assert {g.name.split(".")[1]: (g.low, g.high) for g in genome.genes}["density"] == (0.2, 0.8)
    fixed = load(tiny_space(tiny_zoo, tmp_path, genome={"type": "parameter", "method": method,
                                                         "parameters": {"epsilon": 0.05}})).build_genome()
    assert {g.name.split(".")[1]: (g.low, g.high) for g in fixed.genes}["density"] == (0.1, 0.9)


@pytest.mark.parametrize("parameters, message", [
    ({"lambda": "one"}, "parameter 'lambda' must be a number, got 'one'"),
    ({"normalize": "nope"}, "parameter 'normalize' must be true or false, got 'nope'"),
])
def test_fixed_parameters_are_planned_when_the_space_is_read(tiny_zoo, tmp_path, parameters, message):
    space = load(tiny_space(tiny_zoo, tmp_path, genome={"type": "parameter", "method": "ties",
                                                        "parameters": parameters}))
    with pytest.raises(EvomergeError, match=r"tiny\.yaml: genome: parameters: .*" + re.escape(message)):
        space.check("tiny.yaml")


def test_a_source_listed_twice_and_other_kinds_of_yaml_are_refused(tiny_zoo, tmp_path):
    path = tiny_space(tiny_zoo, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["models"]["sources"].append(data["models"]["sources"][0])
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError, match=r"models.sources\[3\]: '.*copy' is models.sources\[0\] again"):
        load(path)
    merge = tmp_path / "merge.yaml"
    merge.write_text("merge_method: ties\nbase_model: a\nmodels: [{model: b}]\n")
    with pytest.raises(EvomergeError, match=r"merge.yaml: this is a merge config .*run it with `evomerge merge"):
        SearchSpace.from_file(merge)


def test_labels_of_models_with_one_directory_name_stay_distinct(tiny_zoo, tmp_path):
    from evomerge.spaces.models import open_pool

    paths = []
    for parent, name, member in (("m1", "a", "base"), ("m2", "a3", "copy"), ("m3", "a", "rev"), ("m4", "a", "sort")):
        (tmp_path / parent).mkdir()
        (tmp_path / parent / name).symlink_to(tiny_zoo.models[member])
        paths.append(str(tmp_path / parent / name))
    base, sources = open_pool(paths[0], paths[1:])
    # the third "a" would have been "a3" (its position), the name of the second model
    assert [base.label, *(m.label for m in sources)] == ["a", "a3", "a2", "a4"]


def test_space_errors_name_file_line_and_key(tiny_zoo, tmp_path):
    path = tiny_space(tiny_zoo, tmp_path, budget=0)
    with pytest.raises(EvomergeError, match=r"tiny\.yaml: line \d+: budget: Input should be greater than 0"):
        SearchSpace.from_file(path)
    path.write_text(path.read_text().replace("budget: 0", "budget: 3\nbugdet: 4"))
    with pytest.raises(EvomergeError, match=r"bugdet: unknown key; valid keys here: name, description, models"):
        SearchSpace.from_file(path)
    path = tiny_space(tiny_zoo, tmp_path, genome={"type": "parameter", "metod": "ties"})
    with pytest.raises(EvomergeError, match=r"line \d+: genome\.parameter\.metod: unknown key; valid keys here: type, method"):
        SearchSpace.from_file(path)


@pytest.mark.parametrize("name", ["", "  ", "../escape", "/tmp/abs", "a/b", "."])
def test_a_space_name_is_a_plain_directory_name(tiny_zoo, tmp_path, name):
    """It names the run directory under runs/: a path would put the run elsewhere (or inside another run)."""
    with pytest.raises(EvomergeError, match=rf"line \d+: name: must be a plain directory name .* got {re.escape(repr(name))}"):
        SearchSpace.from_file(_named(tiny_space(tiny_zoo, tmp_path), name))


def _named(path, name):
    text = path.read_text().replace("name: tiny", f"name: {name!r}", 1)
    path.write_text(text)
    return path


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_are_what_the_optimizers_take(tiny_zoo, tmp_path, seed):
    with pytest.raises(EvomergeError, match=r"line \d+: seed: Input should be (greater than or equal to 0|less than 4294967296)"):
        SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, seed=seed))


@pytest.mark.parametrize("metrics,aggregate,message", [
    ({"zoo_copy/exact_match": 0}, "mean", "the weights of a mean must sum to more than 0 (they sum to 0.0)"),
    ({"zoo_copy/exact_match": 1, "zoo_rev/exact_match": -1}, "mean", "must sum to more than 0"),
    ({"zoo_copy/exact_match": float("nan")}, "sum", "metric 'zoo_copy/exact_match' has weight nan"),
])
def test_fitness_weights_are_checked_when_the_space_is_read(tiny_zoo, tmp_path, metrics, aggregate, message):
    fitness = [{"name": "f", "direction": "maximize", "metrics": metrics, "aggregate": aggregate}]
    with pytest.raises(EvomergeError, match=re.escape(message)):
        SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, fitness=fitness))
    twice = [{"name": "f", "direction": "maximize", "metrics": ["zoo_copy/exact_match"]}] * 2
    with pytest.raises(EvomergeError, match="fitness name 'f' is used twice"):
        SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, fitness=twice))


def test_staged_budget_must_leave_a_data_flow_stage(tiny_zoo, tmp_path):
    genome = {"type": "staged", "parameter_budget": 4,
              "parameter": {"type": "parameter", "method": "ties"}, "dataflow": {"type": "dataflow"}}
    with pytest.raises(EvomergeError, match=re.escape("budget 4 leaves nothing for the data-flow stage after "
                                                      "genome.parameter_budget 4")):
        SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, genome=genome, budget=4))
    assert SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, genome=genome, budget=5)).budget == 5
    # the data-flow stage's settings are checked with the file, not after the parameter stage has run
    bad = {**genome, "dataflow": {"type": "dataflow", "scale_bounds": [1.5, 0.5]}}
    space = SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, name="bad", genome=bad, budget=5)).resolved()
    with pytest.raises(EvomergeError, match=r"bad.yaml: genome.dataflow: gene scale: bounds \[1.5, 0.5\] are empty"):
        space.check("bad.yaml")


def test_a_data_flow_path_takes_models_of_one_dtype_and_index_free_layers(tiny_zoo, tmp_path):
    """A path stacks layers by reference in one live model: mixed dtypes, or layers that compute by their
    index (GPT-2's scale_attn_by_inverse_layer_idx), are refused when the space is read."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    half = shutil.copytree(tiny_zoo.models["rev"], tmp_path / "rev16")
    for shard in half.glob("*.safetensors"):
        save_file({k: v.bfloat16() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    path = tiny_space(tiny_zoo, tmp_path, name="mixed", genome={"type": "dataflow"})
    data = yaml.safe_load(path.read_text())
    data["models"]["sources"][1] = str(half)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError, match=r"genome: a data-flow path stacks .* these differ \(.*rev16: bfloat16"):
        load(path).check()
    staged = tiny_space(tiny_zoo, tmp_path, name="st", budget=5, genome={
        "type": "staged", "parameter_budget": 2, "parameter": {"type": "parameter", "method": "ties", "dtype": "bfloat16"},
        "dataflow": {"type": "dataflow"}})
    with pytest.raises(EvomergeError, match="st.yaml: genome.parameter.dtype: stage 1 exports its winner in bfloat16"):
        load(staged).check("st.yaml")

    from transformers import GPT2Config, GPT2LMHeadModel

    for name in ("g0", "g1"):
        GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16,
                                   scale_attn_by_inverse_layer_idx=True)).save_pretrained(tmp_path / name)
    assert json.loads((tmp_path / "g0" / "config.json").read_text())["scale_attn_by_inverse_layer_idx"]
    data["models"] = {"base": str(tmp_path / "g0"), "sources": [str(tmp_path / "g1")]}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError, match="config.json sets scale_attn_by_inverse_layer_idx, so each layer"):
        load(path).check()


def test_a_data_flow_dtype_must_be_the_models_own(tiny_zoo, tmp_path):
    """Layers are scored by reference, as stored: a path exported in another dtype is another model."""
    space = SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, genome={"type": "dataflow", "dtype": "bfloat16"}))
    with pytest.raises(EvomergeError, match=r"genome: dtype: bfloat16 is not the models' own \(float32\)"):
        space.resolved().check()
    same = SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path, name="same", genome={"type": "dataflow",
                                                                                      "dtype": "float32"}))
    same.resolved().check()


def test_unknown_and_mismatched_models(tiny_zoo, tmp_path):
    path = tiny_space(tiny_zoo, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["models"]["sources"].append(str(tmp_path / "nowhere"))
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError, match=r"models.sources\[3\]: '.*nowhere': no such file or directory"):
        load(path)
    with pytest.raises(EvomergeError, match="models.base: .*zoo:lm/tiny/missing.*has no model 'missing'"):
        SearchSpace.from_file(tiny_space(tiny_zoo, tmp_path)).with_overrides(
            models={"base": "zoo:lm/tiny/missing", "sources": ["x"]}).resolved()
    # evaluator files are named by their key too
    data = yaml.safe_load(tiny_space(tiny_zoo, tmp_path).read_text())
    data["objective"]["evaluators"].append({"type": "python", "function": "nofile.py:score"})
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError, match=r"objective.evaluators\[1\].function: 'nofile.py': no such file"):
        load(path)


def test_dataflow_genome_decodes_to_a_scaled_layer_path(tiny_zoo, tmp_path):
    from evomerge.materialize.layer_path import input_scales, read_path
    from evomerge.materialize.plan import open_models

    space = load(tiny_space(tiny_zoo, tmp_path, genome={
        "type": "dataflow", "repeats": 2, "threshold": 0.5, "scales": "pair", "scale_bounds": [0.5, 1.5],
    }))
    genome = space.build_genome()
    slots = 3 * 2 * 2  # three 2-layer sources, laid out twice
    assert len(genome.indicator_genes) == slots
    assert len(genome.scale_genes) == (slots + 2) * (slots + 1) // 2
    x = np.full(genome.dim, 0.25)
    used = [1, 4, 6]  # copy.1, sort.0 and (second repeat) copy.0
    x[used] = 0.9
    for (i, j), k in genome.scale_index.items():
        x[slots + k] = (i * 31 + j) % 17 / 17  # a distinct scale per (from, to) pair
    path = genome.path(x)
    models = tiny_zoo.models
    assert [(str(m), layer) for _, m, layer, _ in path] == [
        (str(models["base"]), 0), (str(models["copy"]), 1), (str(models["sort"]), 0), (str(models["copy"]), 0),
        (str(models["base"]), 1)]
    expected = [1.0] + [0.5 + (i * 31 + j) % 17 / 17 for i, j in [(0, 2), (2, 5), (5, 7), (7, 13)]]
    assert [s for *_, s in path] == pytest.approx(expected)
    recipe = genome.decode(x)
    assert recipe.merge_method == "passthrough" and len(recipe.slices) == 5
    steps = read_path(recipe, open_models(recipe))
    assert [(s.model, s.layer) for s in steps] == [(m, layer) for _, m, layer, _ in path]
    assert input_scales(steps)[1:] == pytest.approx(expected[1:])


def test_slot_scales_and_no_scales(tiny_zoo, tmp_path):
    slot = load(tiny_space(tiny_zoo, tmp_path, genome={"type": "dataflow", "repeats": 1, "scales": "slot"}))
    genome = slot.build_genome()
    assert genome.dim == 6 + 7 and genome.names[6] == "scale[->0]" and genome.names[-1] == "scale[->end]"
    none = load(tiny_space(tiny_zoo, tmp_path, name="n", genome={"type": "dataflow", "repeats": 1, "scales": "none"}))
    genome = none.build_genome()
    assert genome.dim == 6
    assert all(s == 1.0 for *_, s in genome.path(np.ones(6)))
    with pytest.raises(EvomergeError, match="a.yaml: genome: anchor .* is neither the base nor a source"):
        load(tiny_space(tiny_zoo, tmp_path, name="a", genome={"type": "dataflow", "anchor": str(tmp_path)})).check("a.yaml")


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate(preset):
    space = SearchSpace.from_file(preset)
    assert space.budget > 0 and space.objective.fitness


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[1] / "search_spaces" / "adamerging").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_adamerging_presets_validate(preset):
    from evomerge.adamerging.config import AdaMergingConfig

    config = AdaMergingConfig.from_file(preset)
    assert config.tasks and config.steps > 0


def test_models_of_different_architectures_are_refused(tiny_zoo, tmp_path):
    import json
    import shutil

    other = tmp_path / "wider"
    shutil.copytree(tiny_zoo.models["rev"], other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    path = tiny_space(tiny_zoo, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["models"]["sources"][1] = str(other)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError, match=r"different architectures.*wider has hidden_size=128.*has 64"):
        load(path).build_genome()


def test_dataflow_starts_at_the_anchors_own_path(tiny_zoo, tmp_path):
    from evomerge.optimize import build_optimizer

    path = tiny_space(tiny_zoo, tmp_path, genome={"type": "dataflow", "repeats": 2, "scales": "pair",
                                                  "anchor": str(tiny_zoo.models["rev"])})
    genome = load(path).build_genome()
    x0 = genome.x0()
    rev = str(tiny_zoo.models["rev"])
    # rev has 2 layers: first and last come from the anchor, no middle layer is switched on
    assert [(m, layer, s) for _, m, layer, s in genome.path(x0)] == [(rev, 0, 1.0), (rev, 1, 1.0)]
    assert load(tiny_space(tiny_zoo, tmp_path, name="b", genome={"type": "dataflow"})).build_genome().x0() is None
    for name in ("cmaes", "tpe", "random"):
        opt = build_optimizer(name, dim=genome.dim, names=genome.names, directions=["maximize"], seed=0,
                              state_dir=tmp_path / name, x0=x0)
        # the start point itself first (CMA-ES: injected into a first generation centred on it)
        assert opt.ask().x.tolist() == x0.tolist(), name


def test_scales_on_a_family_that_cannot_fold_them_are_refused_when_read(tiny_zoo, tmp_path):
    """Post-/sandwich-norm families (here the zoo relabelled as OLMo 2) cannot scale a layer's output."""
    import json
    import shutil

    from evomerge.errors import EvomergeError

    models = {}
    for name in ("base", "copy", "rev", "sort"):
        shutil.copytree(tiny_zoo.models[name], tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "model_type": "olmo2"}))
        models[name] = tmp_path / name
    relabelled = type(tiny_zoo)(tiny_zoo.path, {**tiny_zoo.manifest, "models": {k: str(v) for k, v in models.items()}})
    space = load(tiny_space(relabelled, tmp_path, genome={"type": "dataflow", "scales": "slot"}))
    with pytest.raises(EvomergeError, match="genome: scales: slot needs layers whose residual output can be scaled, "
                                            "which 'olmo2' models do not have"):
        space.check()
    assert load(tiny_space(relabelled, tmp_path, name="none", genome={"type": "dataflow", "scales": "none"})).build_genome()

import pytest

from evomerge.errors import EvomergeError
from evomerge.recipe import NO_MATCH, Recipe, evaluate, interpolate, lookup

SLERP = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

TIES = """\
models:
  - model: base
  - model: math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: code
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


@pytest.mark.parametrize("text", [SLERP, TIES])
def test_round_trip(text):
    recipe = Recipe.from_yaml(text)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_gradient_interpolation_values():
    assert interpolate([0, 1], 0.25) == pytest.approx(0.25)
    # anchors at t = 0, 0.5, 1
    assert interpolate([1, 0.7, 0.1], 0.0) == 1
    assert interpolate([1, 0.7, 0.1], 0.25) == pytest.approx(0.85)
    assert interpolate([1, 0.7, 0.1], 0.75) == pytest.approx(0.4)
    assert interpolate([1, 0.7, 0.1], 1.0) == pytest.approx(0.1)
    assert interpolate([5], 0.6) == 5


def test_filters_first_match_wins_and_fall_through():
    t = Recipe.from_yaml(SLERP).parameters["t"]
    assert evaluate(t, "model.layers.2.self_attn.q_proj.weight", 0.5) == pytest.approx(0.3)
    assert evaluate(t, "model.layers.2.mlp.up_proj.weight", 0.25) == pytest.approx(0.5)
    assert evaluate(t, "model.norm.weight", 0.0) == 0.5
    only_attn = [{"filter": "self_attn", "value": 0.9}]
    assert evaluate(only_attn, "model.layers.0.mlp.up_proj.weight", 0.0) is NO_MATCH
    # precedence: source > slice > global; an unmatched filter falls through
    assert lookup("w", "x.mlp.y", 0.0, {"w": only_attn}, {"w": 0.4}, {"w": 0.1}) == 0.4
    assert lookup("w", "x.self_attn.y", 0.0, {"w": only_attn}, {"w": 0.4}, {"w": 0.1}) == 0.9
    assert lookup("w", "x", 0.0, {}, {}, {"w": 0.1}) == 0.1
    assert lookup("w", "x", 0.0, {}, {}) is NO_MATCH


def test_mergekit_parameter_forms():
    """What mergekit 0.1.5 reads: '*' filters, a lone {filter, value}, empty parameters, gradients of
    numeric strings (interpolated) and of flags (stepped)."""
    r = Recipe.from_yaml("merge_method: linear\nparameters:\nmodels:\n  - model: a\n    parameters:\n"
                         "  - model: b\n    parameters:\n      weight: {filter: mlp, value: 0.9}\n"
                         "      scale: [{filter: '*', value: 0.2}, {value: 0.1}]\n"
                         "      lam: ['1e-1', 0.9]\n      normalize: [true, false]\n")
    assert r.parameters == {} and r.models[0].parameters == {}
    b = r.models[1].parameters
    assert b["weight"] == [{"filter": "mlp", "value": 0.9}]
    assert evaluate(b["weight"], "model.layers.0.mlp.up_proj.weight", 0.0) == 0.9
    assert evaluate(b["weight"], "model.norm.weight", 0.0) is NO_MATCH
    assert evaluate(b["scale"], "lm_head.weight", 0.0) == 0.2  # '*' matches every tensor
    assert evaluate(b["lam"], "x", 0.5) == pytest.approx(0.5)
    # flags step: values[int(t * (n - 1))]
    assert [evaluate(b["normalize"], "x", t) for t in (0.0, 0.99, 1.0)] == [True, True, False]
    assert Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(EvomergeError, match="gradient values must be finite"):
        Recipe.from_yaml("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, .inf]}\n")


@pytest.mark.parametrize(
    "text,match",
    [
        ("merge_method: ties\nmodels: [\n", "line 3"),
        ("merge_method: ties\nmodels:\n  - model: a\n    paramters: {}\n", "line 4: models.0.paramters: unknown key; valid keys here: model, parameters"),
        ("merge_method: ties\nmodles: []\n", "line 2: modles: unknown key; valid keys here: merge_method, base_model"),
        ("merge_method: ties\n", "exactly one of 'models' or 'slices'"),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n      - {model: b, layer_range: [0, 2]}\n",
         "line 3: slices.0: slice sources span different numbers of layers"),
        ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: {x: 1}}\n", "line 4"),
        ("merge_method: ties\nmodels: [{model: a}]\ndtype: float8\n", "dtype must be one of"),
        ("merge_method: ties\nslices:\n  - sources:\n      - {model: a, layer_range: [3, 1]}\n", "layer_range must be"),
        ("- just a list\n", "expected a mapping"),
        ("merge_method: ties\nbase_model: a\nmerge_method: linear\nmodels: [{model: a}]\n",
         "line 3 malformed YAML \\(key 'merge_method' is given twice\\)"),
    ],
)
def test_bad_yaml_names_line_and_key(text, match):
    with pytest.raises(EvomergeError, match=match):
        Recipe.from_yaml(text, "cfg.yaml")


def test_yaml_anchors_merge_and_dtypes_take_the_torch_prefix():
    text = ("merge_method: ties\nparameters: &p {density: 0.5}\nmodels:\n  - model: a\n    parameters:\n"
            "      <<: *p\n      density: 0.7\ndtype: torch.bfloat16\n")
    r = Recipe.from_yaml(text, "cfg.yaml")
    assert r.models[0].parameters == {"density": 0.7} and r.dtype == "bfloat16"


def test_referenced_models_base_first():
    assert Recipe.from_yaml(TIES).referenced_models() == ["base", "math", "code"]

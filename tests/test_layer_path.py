"""Data-flow (layer-path) candidates: recipe folding, resident references, equality with export."""

import json
import shutil

import pytest
import torch
from test_resident import assert_state_equals, candidates, exported

from evomerge.arch import FAMILIES
from evomerge.materialize.export import merge_to_dir
from evomerge.materialize.layer_path import PathStep, input_scales, path_recipe, read_path
from evomerge.materialize.plan import open_models
from evomerge.materialize.resident import MaterializeError, ResidentMerger, ScaledLayer
from evomerge.recipe import Recipe

LLAMA = FAMILIES["llama"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
SCALES = [0.7, 1.3, 1.0, 1.2]


def path_steps(m):
    """A repeated layer, layers from three models, consecutive layers from different models."""
    return [(m["base"], 0), (m["rev"], 1), (m["base"], 0), (m["copy"], 1)]


def zoo_paths(zoo):
    return {k: str(v) for k, v in zoo.models.items()}


@pytest.fixture(scope="module")
def merger(tiny_zoo, device):
    m = tiny_zoo.models
    return ResidentMerger(m["base"], [m[t] for t in tiny_zoo.finetune_tasks], device=device)


@pytest.fixture(scope="module")
def eps0_zoo(tiny_zoo, tmp_path_factory):
    """The tiny zoo with ``rms_norm_eps = 0``: norms exactly scale-invariant, so folding is exact in real arithmetic."""
    root = tmp_path_factory.mktemp("eps0")
    out = {}
    for name, path in tiny_zoo.models.items():
        shutil.copytree(path, root / name)
        config = json.loads((root / name / "config.json").read_text())
        config["rms_norm_eps"] = 0.0
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def eps0_merger(eps0_zoo):
    return ResidentMerger(eps0_zoo["base"], [eps0_zoo[k] for k in ("copy", "rev", "sort")], device="cpu")


def logits(model, ids=IDS):
    """The model's logits for ``ids``, as a CPU tensor whatever device the model is on."""
    with torch.no_grad():
        return model(ids.to(model.device)).logits.cpu()


def export_logits(recipe, tmp_path, name, device="cpu"):
    """Logits of ``recipe`` exported by `evomerge merge` and loaded on ``device``, as the live model would be."""
    from transformers import AutoModelForCausalLM

    out = merge_to_dir(recipe, tmp_path / name, device=device)
    return logits(AutoModelForCausalLM.from_pretrained(out).eval().to(device))


def sakana_logits(steps, scales, ids=IDS):
    """Sakana's forward straight from the source models: embed → (h = s_k·h; h = layer(h)) → norm → lm_head."""
    from transformers import AutoModelForCausalLM

    models = {p: AutoModelForCausalLM.from_pretrained(p).eval() for p in {p for p, _ in steps}}
    first, last = models[steps[0][0]], models[steps[-1][0]]
    n = ids.shape[1]
    position_ids = torch.arange(n)[None]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        h = first.model.embed_tokens(ids)
        rope = first.model.rotary_emb(h, position_ids=position_ids)
        for (p, layer), s in zip(steps, scales):
            h = models[p].model.layers[layer](h * s, attention_mask=mask, position_embeddings=rope,
                                              position_ids=position_ids)
        return last.lm_head(last.model.norm(h))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def wrong_folding(recipe, scales):
    """The same recipe with α_k = s_k instead of 1 / Π s_i."""
    data = recipe.to_dict()
    for sl, s in zip(data["slices"], scales):
        src = sl["sources"][0]
        src.setdefault("parameters", {})["scale"] = [
            {"filter": f, "value": s} for f in LLAMA.residual_out] + [{"value": 1.0}]
    return Recipe.model_validate(data)


def test_path_recipe_folds_scales_and_round_trips_through_yaml(tiny_zoo, merger):
    m = zoo_paths(tiny_zoo)
    recipe = path_recipe(path_steps(m), SCALES, arch=LLAMA, dtype="float32")
    back = Recipe.from_yaml(recipe.to_yaml())
    assert back == recipe and back.dtype == "float32" and len(back.slices) == 4
    path = read_path(back, merger.pool)
    prods = [0.7, 0.7 * 1.3, 0.7 * 1.3 * 1.0, 0.7 * 1.3 * 1.0 * 1.2]
    assert [(s.model, s.layer) for s in path] == path_steps(m)
    assert [s.alpha for s in path] == pytest.approx([1 / p for p in prods], rel=1e-15)
    assert input_scales(path) == pytest.approx(SCALES, rel=1e-12)
    # unit factor: no scale parameter at all; mergekit-style short filters and gradients read back too
    plain = path_recipe([(m["base"], 1)], [1.0], arch=LLAMA)
    assert plain.slices[0].sources[0].parameters == {}
    assert read_path(plain, merger.pool) == [PathStep(m["base"], 1, 1.0)]
    multi = Recipe.model_validate({"merge_method": "passthrough", "slices": [{"sources": [
        {"model": m["rev"], "layer_range": [0, 2], "parameters": {"scale": [
            {"filter": "o_proj", "value": [2.0, 0.5]}, {"filter": "down_proj", "value": [2.0, 0.5]}]}}]}]})
    assert read_path(multi, merger.pool) == [PathStep(m["rev"], 0, 2.0), PathStep(m["rev"], 1, 0.5)]
    assert read_path(recipe, open_models(recipe)) == path  # lazily opened models serve as a pool too


def test_path_equals_export_and_sakana_forward_without_norm_eps(eps0_zoo, eps0_merger, tmp_path):
    """With eps = 0 every identity of the folding is exact: only float rounding remains (~1e-7)."""
    steps = path_steps(eps0_zoo)
    recipe = path_recipe(steps, SCALES, arch=LLAMA)
    live = logits(eps0_merger.materialize(recipe))
    assert rel(live, export_logits(recipe, tmp_path, "right")) < 1e-5
    assert rel(live, sakana_logits(steps, SCALES)) < 1e-5
    # the tolerance is tight: folding α = s instead of 1/Πs is off by percents
    assert rel(live, export_logits(wrong_folding(recipe, SCALES), tmp_path, "wrong")) > 1e-2
    # a hand-written multi-layer slice with mergekit's short filters and a gradient
    multi = Recipe.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": eps0_zoo["sort"], "layer_range": [0, 1]}]},
        {"sources": [{"model": eps0_zoo["rev"], "layer_range": [0, 2], "parameters": {"scale": [
            {"filter": "o_proj", "value": [0.8, 1.5]}, {"filter": "down_proj", "value": [0.8, 1.5]},
            {"value": 1.0}]}}]}]})
    live = logits(eps0_merger.materialize(multi))
    assert rel(live, export_logits(multi, tmp_path, "multi")) < 1e-5
    sakana_steps = [(eps0_zoo["sort"], 0), (eps0_zoo["rev"], 0), (eps0_zoo["rev"], 1)]
    assert rel(live, sakana_logits(sakana_steps, [1.0, 1 / 0.8, 0.8 / 1.5])) < 1e-5


def test_path_matches_export_within_norm_eps_on_the_zoo(tiny_zoo, merger, tmp_path):
    """With the zoo's eps = 1e-5 the folded layer normalizes α·y where the wrapper normalizes y.

    N(α·y) = y / sqrt(ms(y) + eps/α²): the tiny zoo's residual stream has rms ≈ 0.02
    (ms ≈ 4e-4, only ~40·eps), so α ∈ [0.9, 1.43] moves each norm by up to ~1%;
    measured 1.3e-3 of the logit scale, against ~6e-2 for a wrong folding.
    The resident path is Sakana's forward exactly except the final norm, which
    sees α_n·x_n (one norm's eps effect): measured 5e-7.
    """
    steps = path_steps(zoo_paths(tiny_zoo))
    recipe = path_recipe(steps, SCALES, arch=LLAMA)
    live = logits(merger.materialize(recipe))
    right = rel(live, export_logits(recipe, tmp_path, "right", merger.device))
    wrong = rel(live, export_logits(wrong_folding(recipe, SCALES), tmp_path, "wrong", merger.device))
    assert right < 3e-3 and wrong > 10 * right
    assert rel(live, sakana_logits(steps, SCALES)) < 1e-5
    # unit scales: nothing to fold, so the path is export exactly (same modules, same arithmetic)
    plain = path_recipe(steps, [1.0] * 4, arch=LLAMA)
    assert torch.equal(logits(merger.materialize(plain)), export_logits(plain, tmp_path, "plain", merger.device))


def test_path_sets_layer_count_and_generates_with_cache(tiny_zoo, merger):
    m = zoo_paths(tiny_zoo)
    recipe = path_recipe([(m["base"], 0), (m["base"], 1), (m["base"], 0), (m["rev"], 1), (m["base"], 1)],
                         [1.1, 0.9, 1.3, 0.8, 1.0], arch=LLAMA)
    live = merger.materialize(recipe)
    assert live.config.num_hidden_layers == 5 and len(live.model.layers) == 5
    assert live.model.layers[0].layer is live.model.layers[2].layer  # one module, two positions
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ids = IDS.to(live.device)
    cached = live.generate(ids, **kw)
    uncached = live.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences) and cached.sequences.shape[1] == IDS.shape[1] + 6
    # the scores, not just the argmax: a shared layer_idx would mix the repeated layer's keys (off by ~0.5)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # recent transformers name the output's cache `cache`, earlier ones `past_key_values`
    layers = (getattr(cached, "cache", None) or cached.past_key_values).layers
    assert len(layers) == 5 and all(kv.keys.shape[2] == IDS.shape[1] + 5 for kv in layers)  # one slot per position


def test_path_layers_reference_pool_tensors(tiny_zoo, merger):
    m = zoo_paths(tiny_zoo)
    steps = path_steps(m)
    live = merger.materialize(path_recipe(steps, SCALES, arch=LLAMA))
    for wrapper, (model, layer) in zip(live.model.layers, steps):
        assert isinstance(wrapper, ScaledLayer)
        params = dict(wrapper.layer.named_parameters())
        assert len(params) == sum(1 for n in merger.pool[model].names if LLAMA.layer_of(n) == layer)
        for suffix, param in params.items():
            assert param.data_ptr() == merger.pool[model].tensor(LLAMA.layer_name(layer, suffix)).data_ptr()


def test_parameter_space_after_path_is_bit_exact(tiny_zoo, merger, tmp_path):
    m = zoo_paths(tiny_zoo)
    good = Recipe.model_validate(candidates(tiny_zoo)[1])  # task_arithmetic
    want = exported(good, tmp_path, "ta", merger.device)
    own = merger.materialize(good).model.layers
    path = path_recipe(path_steps(m), SCALES, arch=LLAMA)
    for _ in range(2):
        merger.materialize(path)
        live = merger.materialize(good)
        assert live.model.layers is own and live.config.num_hidden_layers == 2
        assert_state_equals(live, want)
    # the pool (source weights) is untouched by the path's in-place global writes
    base = merger.pool[m["base"]]
    assert torch.equal(base.tensor("model.embed_tokens.weight").cpu(), exported(
        Recipe.model_validate({"merge_method": "passthrough", "models": [{"model": m["base"]}]}), tmp_path, "b")[
        "model.embed_tokens.weight"])


def test_bad_paths_are_typed_errors_and_the_merger_survives(tiny_zoo, merger):
    m = zoo_paths(tiny_zoo)
    good = path_recipe(path_steps(m), SCALES, arch=LLAMA)
    want = logits(merger.materialize(good))

    def path(*sources, **top):
        slices = [{"sources": list(s)} for s in sources]
        return Recipe.model_validate({"merge_method": "passthrough", "slices": slices, **top})

    bad = {
        "is not in the resident pool": path([{"model": "/elsewhere/model", "layer_range": [0, 1]}]),
        r"layer_range \[1, 3\] of .* exceeds its 2 layers": path([{"model": m["rev"], "layer_range": [1, 3]}]),
        "only output-projection scales .* can be materialized by reference": path(
            [{"model": m["rev"], "layer_range": [0, 1], "parameters": {"scale": 0.5}}]),
        "embed_tokens.weight: only output-projection": path(
            [{"model": m["rev"], "layer_range": [0, 1]}], parameters={"scale": [{"filter": "embed", "value": 2.0}]}),
        "scales its output projections differently": path(
            [{"model": m["rev"], "layer_range": [0, 1], "parameters": {"scale": [{"filter": "o_proj", "value": .5}]}}]),
        "must be positive": path([{"model": m["rev"], "layer_range": [0, 1], "parameters": {"scale": [
            {"filter": "o_proj", "value": -1.0}, {"filter": "down_proj", "value": -1.0}]}}]),
        "one source per slice": path(
            [{"model": m["rev"], "layer_range": [0, 1]}, {"model": m["copy"], "layer_range": [0, 1]}]),
    }
    for message, recipe in bad.items():
        with pytest.raises(MaterializeError, match=message):
            merger.materialize(recipe)
        assert torch.equal(logits(merger.model), want)  # a rejected candidate changes nothing
    with pytest.raises(MaterializeError, match="is not in the resident pool"):
        read_path(bad["is not in the resident pool"], merger.pool)
    assert torch.equal(logits(merger.materialize(good)), want)


def test_gpt2_path_folds_its_c_proj_and_generates(tmp_path):
    """The other mapped family: GPT-2 (LayerNorm with biases, Conv1D c_proj with bias, tied LM head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32, layer_norm_epsilon=0.0,
                            bos_token_id=0, eos_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / f"g{seed}")
        paths.append(str(tmp_path / f"g{seed}"))
    gpt2 = ResidentMerger(paths[0], [paths[1]], device="cpu")
    recipe = path_recipe([(paths[0], 0), (paths[1], 1), (paths[0], 0)], [0.7, 1.3, 1.2], arch=FAMILIES["gpt2"])
    live = gpt2.materialize(recipe)
    assert live.config.n_layer == 3 and len(live.transformer.h) == 3
    assert rel(logits(live, IDS), export_logits(recipe, tmp_path, "g_out")) < 1e-5
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    for a, b in zip(live.generate(IDS, **kw).scores, live.generate(IDS, use_cache=False, **kw).scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    models = [{"model": p, "parameters": {"weight": 0.5}} for p in paths]
    gpt2.materialize(Recipe.model_validate({"merge_method": "linear", "models": models}))
    assert live.config.n_layer == 2 and len(live.transformer.h) == 2


@pytest.mark.parametrize("stored", [True, False])
def test_sliding_window_layers_keep_their_type_in_a_path(tmp_path, stored):
    """Qwen2 with per-layer ``layer_types``: a path's (and a frankenmerge's) layer types follow its source
    layers, and the live path runs (its layer count and types set together) and equals the export. Also
    when config.json leaves ``layer_types`` out and the config class derives it (from ``max_window_layers``):
    the output lists it per source layer, or transformers would derive it again by position."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=50, max_position_embeddings=32, use_sliding_window=True,
                             sliding_window=3, max_window_layers=2, bos_token_id=0, eos_token_id=0,
                             layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
        Qwen2ForCausalLM(config).save_pretrained(tmp_path / f"q{seed}")
        paths.append(str(tmp_path / f"q{seed}"))
        if not stored:
            file = tmp_path / f"q{seed}" / "config.json"
            file.write_text(json.dumps({k: v for k, v in json.loads(file.read_text()).items() if k != "layer_types"}))
    steps = [(paths[0], 0), (paths[1], 2), (paths[0], 1), (paths[1], 3), (paths[0], 2)]
    recipe = path_recipe(steps, [1.0] * len(steps), arch=LLAMA)
    want = ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    out = merge_to_dir(recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["layer_types"] == want
    live = ResidentMerger(paths[0], [paths[1]], device="cpu").materialize(recipe)
    assert live.config.num_hidden_layers == 5 and live.config.layer_types == want
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])  # longer than the window
    assert rel(logits(live, ids), _logits_of(out, ids)) < 1e-5


def _logits_of(path, ids):
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(path).eval(), ids)

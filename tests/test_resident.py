"""ResidentMerger: in-place candidates equal `evomerge merge` bit for bit, with no drift."""

import pytest
import torch
from conftest import DEVICES

from evomerge.io.model_dir import ModelDir
from evomerge.materialize.export import merge_to_dir
from evomerge.materialize.resident import MaterializeError, ResidentMerger
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def merger(tiny_zoo, device):
    m = tiny_zoo.models
    return ResidentMerger(m["base"], [m[t] for t in tiny_zoo.finetune_tasks], device=device)


def candidates(zoo):
    m = {k: str(v) for k, v in zoo.models.items()}
    fts = zoo.finetune_tasks
    each = lambda params: [{"model": m[t], "parameters": params} for t in fts]  # noqa: E731
    return [
        {"merge_method": "linear", "models": each({"weight": [0.2, 0.9]})},
        {"merge_method": "task_arithmetic", "base_model": m["base"], "models": each({"weight": 0.7}),
         "parameters": {"lambda": [0.2, 0.6]}},
        {"merge_method": "ties", "base_model": m["base"], "models": each(
            {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 1.0}], "density": [0.9, 0.2]})},
        {"merge_method": "dare_ties", "base_model": m["base"], "models": each({"weight": 1.0, "density": 0.4}),
         "random_seed": 11},
        {"merge_method": "dare_linear", "base_model": m["base"], "models": each({"weight": 0.5, "density": 0.6}),
         "random_seed": 3},
        {"merge_method": "slerp", "base_model": m["base"], "models": [{"model": m["base"]}, {"model": m[fts[0]]}],
         "parameters": {"t": [0.1, 0.8]}},
        {"merge_method": "breadcrumbs_ties", "base_model": m["base"], "models": each({"weight": 1.0, "density": 0.7})},
        {"merge_method": "della", "base_model": m["base"], "models": each({"weight": 1.0, "density": 0.5, "epsilon": 0.1})},
        {"merge_method": "model_stock", "base_model": m["base"], "models": each({})},
    ]


def exported(recipe, tmp_path, name, device="cpu"):
    """`evomerge merge` of ``recipe`` computed on ``device``, read back as CPU tensors."""
    out = merge_to_dir(recipe, tmp_path / name, device=device)
    d = ModelDir(out)
    return {n: d.tensor(n) for n in d.names}


def assert_equal_to_export_twice(merger, recipes, tmp_path):
    """Every recipe materialized twice in a row (in-place updates must not leak from one candidate into
    the next) equals its `evomerge merge` export on every tensor."""
    expected = [exported(r, tmp_path, f"c{i}", merger.device) for i, r in enumerate(recipes)]
    for _ in range(2):
        for recipe, want in zip(recipes, expected):
            assert_state_equals(merger.materialize(recipe), want, recipe.merge_method)


def assert_state_equals(model, want, label=""):
    state = model.state_dict()
    for name, tensor in want.items():
        assert torch.equal(state[name].cpu(), tensor), (label, name)


def test_every_method_equals_export_bit_for_bit_without_drift(tiny_zoo, merger, tmp_path):
    assert_equal_to_export_twice(merger, [Recipe.model_validate(c) for c in candidates(tiny_zoo)], tmp_path)


def test_live_model_is_reused_and_generates(tiny_zoo, merger):
    first = merger.materialize(Recipe.model_validate(candidates(tiny_zoo)[1]))
    ptrs = {n: p.data_ptr() for n, p in first.named_parameters()}
    second = merger.materialize(Recipe.model_validate(candidates(tiny_zoo)[2]))
    assert second is first and ptrs == {n: p.data_ptr() for n, p in second.named_parameters()}
    # the parameters of a block are views of one buffer: a block is written with one copy
    state = second.state_dict()
    for block in merger.pool[merger.base].blocks:
        storages = {state[name].untyped_storage().data_ptr() for name in block.names}
        assert len(storages) == 1, block.names
    out = second.generate(torch.tensor([[5, 6, 7]], device=merger.device), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


def test_bad_candidates_are_typed_errors_and_the_merger_survives(tiny_zoo, merger, tmp_path):
    m = {k: str(v) for k, v in tiny_zoo.models.items()}
    stranger = Recipe.model_validate({"merge_method": "linear", "models": [{"model": "/elsewhere/model", "parameters": {"weight": 1.0}}]})
    with pytest.raises(MaterializeError, match="'/elsewhere/model' is not in the resident pool"):
        merger.materialize(stranger)
    blowup = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": m["base"],
                                    "models": [{"model": m["rev"], "parameters": {"weight": 1e38}}],
                                    "parameters": {"lambda": 1e38}})
    with pytest.raises(MaterializeError, match="NaN or Inf"):
        merger.materialize(blowup)
    # a frankenmerge is a layer path (tests/test_layer_path.py); a plain scalar scale cannot be referenced
    frank = Recipe.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["rev"], "layer_range": [0, 1], "parameters": {"scale": 0.5}}]}]})
    with pytest.raises(MaterializeError, match="only output-projection scales"):
        merger.materialize(frank)
    good = Recipe.model_validate(candidates(tiny_zoo)[1])
    assert_state_equals(merger.materialize(good), exported(good, tmp_path, "after", merger.device))


def test_task_vector_candidates_wait_for_the_device_once(tiny_zoo, merger):
    """On CUDA a blockwise candidate queues all its kernels; the host waits once, for the finiteness check."""
    if merger.device == "cpu":
        pytest.skip("host syncs are a CUDA matter")
    import warnings

    recipes = [Recipe.model_validate(c) for c in task_vector_candidates(tiny_zoo)[:2]]
    for recipe in recipes:
        merger.materialize(recipe)  # builds the magnitude indexes
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for recipe in recipes:
                merger.materialize(recipe)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == len(recipes), syncs


def task_vector_candidates(zoo):
    """Candidates of the blockwise route, with per-tensor parameters that differ across each block."""
    m = {k: str(v) for k, v in zoo.models.items()}
    fts = zoo.finetune_tasks
    each = lambda params: [{"model": m[t], "parameters": params} for t in fts]  # noqa: E731
    base = m["base"]
    return [
        {"merge_method": "task_arithmetic", "base_model": base, "models": each({"weight": [0.1, 0.9]}),
         "parameters": {"lambda": [{"filter": "self_attn", "value": 1.5}, {"value": 1.0}], "normalize": True}},
        {"merge_method": "ties", "base_model": base, "models": each(
            {"weight": [{"filter": "mlp", "value": -0.4}, {"value": 1.0}], "density": [1.0, 0.05]})},
        {"merge_method": "ties", "base_model": base, "parameters": {"normalize": [{"filter": "mlp", "value": False}, {"value": True}], "rescale": True},
         "models": each({"weight": 0.8, "density": [0.3, 0.6]})},
        {"merge_method": "dare_ties", "base_model": base, "models": each({"weight": 0.9, "density": [0.2, 1.0]}),
         "parameters": {"rescale_method": "inverse_density"}, "random_seed": 5},
        {"merge_method": "dare_linear", "base_model": base, "models": each({"weight": 0.5, "density": 0.6}),
         "random_seed": 3},
    ]


PLACEMENTS = [("cpu", "device", 1 << 22), ("cpu", "disk", 3000)] + [
    ("cuda", placement, block_numel) for placement, block_numel in [("device", 1 << 22), ("host", 3000), ("disk", 3000)]
    if "cuda" in DEVICES]


@pytest.mark.parametrize("device,placement,block_numel", PLACEMENTS)
def test_blockwise_route_equals_export_for_every_placement_and_block_size(tiny_zoo, tmp_path, monkeypatch,
                                                                        device, placement, block_numel):
    from evomerge.materialize import resident

    routed = []
    real = resident.merge_block
    monkeypatch.setattr(resident, "merge_block", lambda *a, **k: routed.append(k["method"]) or real(*a, **k))
    m = tiny_zoo.models
    merger = ResidentMerger(m["base"], [m[t] for t in tiny_zoo.finetune_tasks], device=device,
                            placement=placement, block_numel=block_numel)
    assert merger.memory.placement == placement and placement in merger.memory.describe()
    blocks = merger.pool[str(m["base"])].blocks
    assert len(blocks) == 1 if block_numel > 1 << 20 else len(blocks) > 4
    assert (merger.pool[str(m["base"])].nbytes == 0) == (placement == "disk")
    recipes = [Recipe.model_validate(c) for c in task_vector_candidates(tiny_zoo)]
    assert_equal_to_export_twice(merger, recipes, tmp_path)
    assert set(routed) == {"task_arithmetic", "ties", "dare_ties", "dare_linear"}
    assert len(routed) == 2 * len(recipes) * len(blocks)
    # a dtype conversion before the arithmetic is not what the magnitude index was built from: per-tensor route
    routed.clear()
    converted = Recipe.model_validate({**task_vector_candidates(tiny_zoo)[1], "dtype": "bfloat16"})
    assert_state_equals(merger.materialize(converted), exported(converted, tmp_path, "bf16", device))
    assert not routed


def bfloat16_zoo(zoo, root):
    """The zoo's models with every tensor stored as bfloat16 (real LLMs' dtype: few distinct task-vector
    magnitudes, long runs of equal ones at TIES cuts)."""
    import json
    import shutil
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    models = {}
    for name, path in zoo.models.items():
        models[name] = shutil.copytree(path, root / name)
        for shard in models[name].glob("*.safetensors"):
            save_file({k: v.bfloat16() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
        config = models[name] / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "bfloat16"}))
    return SimpleNamespace(models=models, finetune_tasks=zoo.finetune_tasks)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_route_equals_export(tiny_zoo, tmp_path, monkeypatch, dtype):
    """The compiled CPU kernels (forced on, for spans of any size) give export's floats, run after run; in
    bfloat16 TIES cuts come from exact magnitude tables and fall inside runs of equal magnitudes."""
    from evomerge.materialize import fused
    from evomerge.methods import magnitude_index

    monkeypatch.setattr(fused, "MIN_NUMEL", 2)
    monkeypatch.setattr(fused, "ROW", 256)
    monkeypatch.setattr(magnitude_index, "EXACT_RATIO", 4)  # the tiny zoo's tensors are short
    zoo = tiny_zoo if dtype == "float32" else bfloat16_zoo(tiny_zoo, tmp_path / "zoo16")
    compiled = []
    real = fused._run
    monkeypatch.setattr(fused, "_run", lambda name, *a, **k: compiled.append(name) or real(name, *a, **k))
    m = zoo.models
    merger = ResidentMerger(m["base"], [m[t] for t in zoo.finetune_tasks], device="cpu", fused=True)
    assert_equal_to_export_twice(merger, [Recipe.model_validate(c) for c in task_vector_candidates(zoo)], tmp_path)
    # float32 deltas have too many distinct magnitudes for tables: cuts from the high halves' buckets
    tables = sum(len(index.exact) for index in merger._indexes.values())
    assert (tables > 0) == (dtype == "bfloat16") and not fused._broken
    assert {"merge", "row_matches" if tables else "high_halves"} <= set(compiled)
    # the memory plan's workspace holds the tables it built
    plain = ResidentMerger(m["base"], [m[t] for t in zoo.finetune_tasks], device="cpu", fused=False)
    table_bytes = sum(bits.nbytes + ends.nbytes
                      for index in merger._indexes.values() for bits, ends in index.exact.values())
    assert table_bytes <= merger.memory.workspace_bytes - plain.memory.workspace_bytes


def test_a_family_whose_tensors_are_stacked_on_load_is_refused_clearly(tmp_path):
    """Mixtral's experts are stacked into one live tensor on load: no in-place writes by name, one clear error."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from evomerge.errors import EvomergeError

    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    with pytest.raises(EvomergeError, match="MixtralForCausalLM: its checkpoint tensors are split or stacked on load"):
        ResidentMerger(tmp_path / "moe", [tmp_path / "moe"], device="cpu")

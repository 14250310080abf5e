"""The vision zoo (tiny): data, fixed heads, the image accuracy evaluator, merges and AdaMerging on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.evaluation import build_evaluator
from evomerge.io.live import checkpoint_names, load_model
from evomerge.zoo.vision import HEAD_PREFIX, task_split


def test_manifest_splits_and_reuse(tiny_vision_zoo):
    from evomerge.zoo import build_zoo

    zoo = tiny_vision_zoo
    assert zoo.manifest["kind"] == "vision" and zoo.finetune_tasks == ["digits", "rotated", "inverted", "noisy"]
    spec = zoo.manifest["spec"]
    for task in zoo.finetune_tasks:
        for split, n in (("train", spec["n_train"]), ("test", spec["n_test"]), ("unlabeled", spec["n_unlabeled"])):
            with np.load(task_split(zoo, task, split)) as data:
                assert data["pixel_values"].shape == (n, 1, 8, 8)
                assert ("labels" in data.files) == (split != "unlabeled")
    # the transformations are what they say: rotated = rot90 of digits, inverted = 1 - digits
    with np.load(task_split(zoo, "digits", "test")) as d, np.load(task_split(zoo, "rotated", "test")) as r:
        np.testing.assert_array_equal(np.rot90(d["pixel_values"], 1, axes=(2, 3)), r["pixel_values"])
        np.testing.assert_array_equal(d["labels"], r["labels"])
    with np.load(task_split(zoo, "digits", "test")) as d, np.load(task_split(zoo, "inverted", "test")) as i:
        np.testing.assert_allclose(1.0 - d["pixel_values"], i["pixel_values"])
    again = build_zoo("vision", "tiny", zoo.path, seed=0)
    assert again.manifest["build_seconds"] == zoo.manifest["build_seconds"]  # reused, not rebuilt
    with pytest.raises(EvomergeError, match="no task 'mnist'"):
        task_split(zoo, "mnist", "test")


def test_fine_tunes_beat_the_pretrained_encoder_on_their_own_task(tiny_vision_zoo):
    gains = tiny_vision_zoo.manifest["verification"]["finetune_gain"]
    assert sum(g > 0 for g in gains.values()) >= 3 and sum(gains.values()) / len(gains) > 0.03
    # and the recorded numbers are real: recompute one with the accuracy evaluator
    task = "rotated"
    model = load_model(tiny_vision_zoo.models[task])
    ev = build_evaluator({"type": "accuracy", "path": str(task_split(tiny_vision_zoo, task, "test"))})
    assert ev(model, None)["accuracy"] == pytest.approx(tiny_vision_zoo.manifest["verification"]["table"][task][task])


def test_heads_are_scaled_cosine_similarities(tiny_vision_zoo):
    model = load_model(tiny_vision_zoo.models["base"])
    with np.load(task_split(tiny_vision_zoo, "digits", "test")) as d:
        x = torch.from_numpy(d["pixel_values"][:32])
    with torch.no_grad():
        features = model.vit(pixel_values=x).last_hidden_state[:, 0]
        logits = model(pixel_values=x).logits
    weight = model.classifier.weight
    scale = tiny_vision_zoo.manifest["spec"]["head_scale"]
    cos = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(weight, dim=-1).T
    torch.testing.assert_close(logits, scale * cos, rtol=1e-3, atol=1e-3)
    assert features.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(features.shape[-1]), rel=1e-3)
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_random_heads_are_orthonormal_class_directions_the_fine_tunes_learn(tmp_path, monkeypatch):
    """``head_alignment: 0`` (the small zoo's): heads owe nothing to the pre-trained encoder, which is then near
    chance, and each fine-tune moves the encoder onto its task's directions."""
    import dataclasses

    from evomerge.zoo import build_zoo
    from evomerge.zoo.spec import VISION_SIZES

    spec = dataclasses.replace(VISION_SIZES["tiny"], head_alignment=0.0, ft_lr=3e-3)
    monkeypatch.setitem(VISION_SIZES, "tiny", spec)
    zoo = build_zoo("vision", "tiny", tmp_path / "zoo", seed=0)
    heads = {t: load_model(zoo.models[t]).classifier.weight.detach() for t in zoo.finetune_tasks}
    for weight in heads.values():
        gram = weight @ weight.T * spec.hidden_size / spec.head_scale ** 2
        torch.testing.assert_close(gram, torch.eye(10), atol=1e-5, rtol=0)
    first, second = list(heads.values())[:2]
    assert (first - second).abs().max() > 0.1  # each task its own directions
    table = zoo.manifest["verification"]["table"]
    assert sum(table["base"].values()) / len(table["base"]) < 0.3
    assert all(table[t][t] > table["base"][t] + 0.2 for t in zoo.finetune_tasks)


def test_head_alignment_blends_class_means_with_random_directions(tiny_vision_zoo):
    import dataclasses

    from evomerge.zoo.spec import VISION_SIZES
    from evomerge.zoo.vision import cosine_head, task_head

    model = load_model(tiny_vision_zoo.models["base"])
    with np.load(task_split(tiny_vision_zoo, "digits", "train")) as d:
        train = (d["pixel_values"], d["labels"])
    means = torch.nn.functional.normalize(cosine_head(model, *train, 1.0), dim=-1)
    alignment = {}
    for a in (0.0, 0.25, 0.5, 1.0):
        spec = dataclasses.replace(VISION_SIZES["tiny"], head_alignment=a)
        head = task_head(model, train, spec, torch.Generator().manual_seed(0))
        norms = head.norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, spec.head_scale / math.sqrt(spec.hidden_size)))
        alignment[a] = (torch.nn.functional.normalize(head, dim=-1) * means).sum(-1).mean().item()
    assert alignment[1.0] == pytest.approx(1.0, abs=1e-6) and abs(alignment[0.0]) < 0.3
    assert alignment[0.0] < alignment[0.25] < alignment[0.5] < alignment[1.0]


def test_accuracy_with_a_swapped_head_equals_a_manual_count(tiny_vision_zoo):
    zoo = tiny_vision_zoo
    live = load_model(zoo.models["base"])  # carries the digits head
    task = "inverted"
    ev = build_evaluator({"type": "accuracy", "path": str(task_split(zoo, task, "test")), "batch_size": 7,
                          "head_from": str(zoo.models[task]), "name": task})
    got = ev(live, None)[f"{task}/accuracy"]
    reference = load_model(zoo.models["base"])
    own_head = load_model(zoo.models[task]).classifier
    with torch.no_grad():
        reference.classifier.load_state_dict(own_head.state_dict())
    with np.load(task_split(zoo, task, "test")) as d:
        predicted = reference(pixel_values=torch.from_numpy(d["pixel_values"])).logits.argmax(-1).numpy()
        expected = float((predicted == d["labels"]).mean())
    assert got == expected
    assert not torch.equal(live.classifier.weight, load_model(zoo.models["base"]).classifier.weight)
    entropy = build_evaluator({"type": "entropy", "path": str(task_split(zoo, task, "unlabeled")),
                               "head_from": str(zoo.models[task])})(live, None)["entropy"]
    assert 0 < entropy < math.log(10)


def test_bad_image_data_and_heads_are_named(tiny_vision_zoo, tmp_path):
    zoo = tiny_vision_zoo
    live = load_model(zoo.models["base"])
    no_labels = tmp_path / "x.npz"
    np.savez(no_labels, pixel_values=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(EvomergeError, match=r"x.npz: no array 'labels' \(it has pixel_values\)"):
        build_evaluator({"type": "accuracy", "path": str(no_labels)}).setup(live, None)
    bad_label = tmp_path / "y.npz"
    np.savez(bad_label, pixel_values=np.zeros((3, 1, 8, 8), np.float32), labels=np.array([1, 12, 3]))
    with pytest.raises(EvomergeError, match="y.npz: row 2: label 12 is not a class of the model"):
        build_evaluator({"type": "accuracy", "path": str(bad_label)}).setup(live, None)
    # float labels: integral ones are their class, others are not truncated into one
    np.savez(bad_label, pixel_values=np.zeros((3, 1, 8, 8), np.float32), labels=np.array([1.0, 2.0, 3.5]))
    with pytest.raises(EvomergeError, match="y.npz: row 3: label 3.5 is not a class of the model"):
        build_evaluator({"type": "accuracy", "path": str(bad_label)}).setup(live, None)
    np.savez(bad_label, pixel_values=np.zeros((3, 1, 8, 8), np.float32), labels=np.array([1.0, 2.0, 3.0]))
    build_evaluator({"type": "accuracy", "path": str(bad_label)}).setup(live, None)
    nan = tmp_path / "nan.npz"
    pixels = np.zeros((3, 1, 8, 8), np.float32)
    pixels[1, 0, 2, 2] = np.nan
    np.savez(nan, pixel_values=pixels, labels=np.array([1, 2, 3]))
    with pytest.raises(EvomergeError, match=r"nan.npz: array 'pixel_values' holds NaN or Inf values \(row 1 first\)"):
        build_evaluator({"type": "accuracy", "path": str(nan)}).setup(live, None)
    with pytest.raises(EvomergeError, match="no tensor starts with head prefix 'head.'"):
        build_evaluator({"type": "accuracy", "path": str(task_split(zoo, "digits", "test")),
                         "head_from": str(zoo.models["digits"]), "head_prefix": "head."}).setup(live, None)
    with pytest.raises(EvomergeError, match=r"head tensor 'vit.embeddings.cls_token' has shape"):
        other = load_model(zoo.models["base"])
        with torch.no_grad():
            other.vit.embeddings.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 5))
        build_evaluator({"type": "entropy", "path": str(task_split(zoo, "digits", "unlabeled")),
                         "head_from": str(zoo.models["digits"]), "head_prefix": "vit.embeddings.cls"}).setup(other, None)


def test_resident_vit_merge_equals_export(tiny_vision_zoo, tmp_path):
    from evomerge.io.model_dir import ModelDir
    from evomerge.materialize.export import merge_to_dir
    from evomerge.materialize.resident import ResidentMerger
    from evomerge.recipe import Recipe

    m = {k: str(v) for k, v in tiny_vision_zoo.models.items()}
    recipe = Recipe.model_validate({
        "merge_method": "ties", "base_model": m["base"],
        "models": [{"model": m[t], "parameters": {"weight": [0.2, 0.6], "density": 0.5}}
                   for t in tiny_vision_zoo.finetune_tasks],
        "parameters": {"normalize": False},
    })
    out = ModelDir(merge_to_dir(recipe, tmp_path / "merged"))
    merger = ResidentMerger(m["base"], [m[t] for t in tiny_vision_zoo.finetune_tasks], device="cpu")
    live = merger.materialize(recipe)
    state, names = live.state_dict(), checkpoint_names(live)
    assert names["vit.encoder.layer.0.attention.attention.key.bias"] == "vit.layers.0.attention.k_proj.bias"
    for name in out.names:
        assert torch.equal(state[names[name]], out.tensor(name)), name
    assert load_model(tmp_path / "merged").config.num_hidden_layers == 2


def test_adamerging_lowers_entropy_and_moves_the_coefficients(tiny_vision_zoo):
    from evomerge.adamerging import AdaMergingSettings, adamerge
    from evomerge.adamerging.zoo import zoo_adamerging_config

    config = zoo_adamerging_config(tiny_vision_zoo)
    tasks = config.build_tasks()
    assert all(set(t.head) == {f"{HEAD_PREFIX}.weight", f"{HEAD_PREFIX}.bias"} for t in tasks)
    result = adamerge(config.base_model, tasks, AdaMergingSettings(granularity="layer", steps=40, lr=1e-2),
                      device="cpu")
    assert result.final_entropy < result.initial_entropy - 1e-3
    assert (result.coefficients - 0.3).abs().max() > 0.05
    # heads are never merged: the exported recipe gives them weight 0
    weights = result.recipe.models[0].parameters["weight"]
    assert weights[0] == {"filter": f"{HEAD_PREFIX}.bias", "value": 0.0}


def test_multihead_entropy_equals_per_task_entropies_in_one_pass(tiny_vision_zoo):
    zoo = tiny_vision_zoo
    live = load_model(zoo.models["base"])
    tasks = zoo.finetune_tasks
    per_task = [build_evaluator({"type": "entropy", "path": str(task_split(zoo, t, "unlabeled")), "limit": 24,
                                 "head_from": str(zoo.models[t])})(live, None)["entropy"] for t in tasks]
    fused = build_evaluator({"type": "multihead_entropy", "limit": 24,
                             "paths": [str(task_split(zoo, t, "unlabeled")) for t in tasks],
                             "heads_from": [str(zoo.models[t]) for t in tasks]})
    assert fused(live, None)["entropy"] == pytest.approx(sum(per_task) / len(per_task), rel=1e-5)
    with pytest.raises(EvomergeError, match="one heads_from model per path"):
        build_evaluator({"type": "multihead_entropy", "paths": ["a.npz"], "heads_from": []})
    with pytest.raises(EvomergeError, match="no linear head 'vit.layernorm.x'"):
        build_evaluator({"type": "multihead_entropy", "paths": [str(task_split(zoo, "digits", "unlabeled"))],
                         "heads_from": [str(zoo.models["digits"])], "head_prefix": "vit.layernorm.x"}).setup(live, None)

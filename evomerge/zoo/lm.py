"""Build the LM zoo: a Llama base and task fine-tunes, trained locally from scratch.

The base is pre-trained on a mixture of character tasks until it is partly
competent at each fine-tune task; each fine-tune then sharpens one task with a
small learning rate. The build measures the result itself (greedy exact match
on the test split for the base, the fine-tunes and task-arithmetic merges) and
records it in ``zoo.json`` together with the recipe.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.fsutil import atomic_dir, write_json_atomic
from evomerge.zoo.registry import MANIFEST, ZooInfo, read_manifest
from evomerge.zoo.spec import LM_SIZES, LMZooSpec
from evomerge.zoo.tasks import make_task

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Task-arithmetic scales the build tries when verifying the zoo.
VERIFY_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
#: A fine-tune must beat the base on its own task by this much exact match.
MIN_FINETUNE_GAIN = 0.20


def get_lm_spec(size: str) -> LMZooSpec:
    """The recipe for LM zoo ``size``, or a clear error naming the known sizes."""
    try:
        return LM_SIZES[size]
    except KeyError:
        raise EvomergeError(
            f"unknown LM zoo size {size!r}; choose one of: {', '.join(LM_SIZES)}"
        ) from None


@contextlib.contextmanager
def pinned_numerics(threads: int, seed: int) -> Iterator[None]:
    """Pin torch's thread count and seed: training results depend on both."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _llama_config(spec: LMZooSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _save_model(model, tokenizer, out: Path, spec: LMZooSpec) -> None:
    import torch

    model = model.to(getattr(torch, spec.dtype))
    model.config.dtype = spec.dtype
    model.save_pretrained(str(out), max_shard_size=spec.max_shard_size)
    tokenizer.save_pretrained(str(out))


def _merged_state(base_sd, ft_sds, lam: float):
    from evomerge.methods.registry import apply_method

    return {
        k: apply_method(
            "task_arithmetic",
            base_sd[k],
            [sd[k] for sd in ft_sds],
            [{"weight": 1.0}] * len(ft_sds),
            {"lambda": lam},
        )
        for k in base_sd
    }


def verify(table: dict[str, dict[str, float]], finetunes: list[str]) -> dict:
    """Check the zoo's acceptance property on a model x task accuracy table.

    Each fine-tune must beat the base by ``MIN_FINETUNE_GAIN`` on its own task,
    and the best merge must beat every single source model on the task average.
    """

    def avg(row: dict[str, float]) -> float:
        return sum(row[t] for t in finetunes) / len(finetunes)

    sources = ["base", *finetunes]
    gains = {t: table[t][t] - table["base"][t] for t in finetunes}
    merges = [m for m in table if m not in sources]
    best_source = max(sources, key=lambda m: avg(table[m]))
    best_merge = max(merges, key=lambda m: avg(table[m])) if merges else None
    merge_wins = best_merge is not None and avg(table[best_merge]) > avg(table[best_source])
    return {
        "finetune_gain": gains,
        "finetunes_ok": all(g >= MIN_FINETUNE_GAIN for g in gains.values()),
        "best_source": best_source,
        "best_source_avg": avg(table[best_source]),
        "best_merge": best_merge,
        "best_merge_avg": avg(table[best_merge]) if best_merge else None,
        "merge_beats_sources": merge_wins,
        "passed": merge_wins and all(g >= MIN_FINETUNE_GAIN for g in gains.values()),
    }


def build_lm_zoo(
    size: str,
    out: Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    progress: Progress | None = None,
) -> ZooInfo:
    """Build (or reuse) the LM zoo ``size`` for ``seed`` at ``out``.

    Returns the existing zoo untouched when ``out`` already holds one with the same
    spec and seed. Builds into a temp dir renamed at the end, so an interrupted
    build leaves nothing behind. ``force`` replaces a zoo with a different spec,
    never a directory that is not a zoo.
    """
    spec = get_lm_spec(size)
    return build_zoo_dir("lm", size, spec, out, seed=seed, force=force, progress=progress,
                         build=lambda tmp, final, say: _build_into(tmp, final, spec, seed, say))


def build_zoo_dir(kind: str, size: str, spec, out: Path | None, *, seed: int, force: bool,
                  progress: Progress | None, build: Callable[[Path, Path, Progress], dict]) -> ZooInfo:
    """The build plumbing every zoo kind shares: reuse by fingerprint, temp dir renamed at the end, manifest.

    ``build(tmp, final, say)`` trains into ``tmp`` (``final`` is where it will
    live) under pinned numerics and returns the manifest's kind-specific part.
    """
    from evomerge.zoo.registry import default_zoo_dir, prepare_zoo_dir

    out = Path(out) if out is not None else default_zoo_dir(kind, size, seed)
    fingerprint = spec.fingerprint(seed)
    existing = prepare_zoo_dir(out, fingerprint, force=force)
    if existing is not None:
        return existing
    say = progress or (lambda msg: log.info(msg))
    start = time.perf_counter()
    with atomic_dir(out.resolve(), replace=force) as tmp:
        with pinned_numerics(spec.threads, seed):
            manifest = build(tmp, out.resolve(), say)
        manifest.update(kind=kind, size=size, seed=seed, fingerprint=fingerprint, spec=asdict(spec),
                        build_seconds=round(time.perf_counter() - start, 1),
                        # what --force may replace: a file of the user's added to the zoo is not on this list
                        files=sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
        write_json_atomic(tmp / MANIFEST, manifest)
    return ZooInfo(out, read_manifest(out))


def _build_into(tmp: Path, final: Path, spec: LMZooSpec, seed: int, say: Progress) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from evomerge.zoo.lmeval_tasks import write_task_files
    from evomerge.zoo.tasks import heldout_split
    from evomerge.zoo.tokenizer import build_char_tokenizer
    from evomerge.zoo.train import CharCodec, MixtureSampler, exact_match, train

    tokenizer = build_char_tokenizer()
    codec = CharCodec(tokenizer)
    tasks = {t.name: make_task(t.name, t.min_len, t.max_len) for t in spec.tasks}
    finetunes = spec.finetune_tasks
    sizes = {"validation": spec.n_validation, "test": spec.n_test, "unlabeled": spec.n_unlabeled}
    splits = {name: heldout_split(tasks[name], seed, sizes) for name in finetunes}
    heldout = {p for per_task in splits.values() for rows in per_task.values() for p, _ in rows}
    say(f"writing task data ({', '.join(finetunes)})")
    write_task_files(tmp / "tasks", final / "tasks", splits, spec.max_gen_toks)

    model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    models: dict[str, str] = {"base": "base"}
    info: dict = {"models": models, "finetune_tasks": finetunes, "tasks_dir": "tasks"}

    if not spec.trained:
        say("saving untrained base")
        base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save_model(model, tokenizer, tmp / "base", spec)
        gen = torch.Generator().manual_seed(seed)
        for name in finetunes:
            say(f"perturbing base into {name}")
            ft = copy.deepcopy(model).float()
            ft.load_state_dict(
                {k: v + spec.perturb_std * torch.randn(v.shape, generator=gen) for k, v in base_sd.items()}
            )
            _save_model(ft, tokenizer, tmp / name, spec)
            models[name] = name
        return info

    def val_scores(m, n: int | None = None) -> dict[str, float]:
        return {t: exact_match(m, codec, splits[t]["validation"][:n], spec.max_gen_toks) for t in finetunes}

    draw = MixtureSampler(
        [tasks[t.name] for t in spec.tasks],
        random.Random(f"{seed}:base"),
        heldout,
        [t.mix_weight for t in spec.tasks],
    )
    position = {t.name: i for i, t in enumerate(spec.tasks)}

    def competent(step: int) -> bool:
        scores = val_scores(model, 100)
        say(f"base step {step}: validation exact match " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        for name, score in scores.items():
            if score >= spec.competence_cap:
                draw.weights[position[name]] = spec.capped_weight * spec.tasks[position[name]].mix_weight
        return spec.competence is not None and min(scores.values()) >= spec.competence

    say("pre-training base on the task mixture")
    info["base_steps"] = train(
        model,
        codec,
        draw,
        max_steps=spec.base_max_steps,
        lr=spec.base_lr,
        batch_size=spec.base_batch,
        warmup=spec.base_warmup,
        check_every=spec.check_every if spec.competence is not None else 0,
        should_stop=competent,
    )
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft_sds = []
    for name in finetunes:
        say(f"fine-tuning {name} ({spec.ft_steps} steps, lr {spec.ft_lr})")
        ft = copy.deepcopy(model)
        train(
            ft,
            codec,
            MixtureSampler([tasks[name]], random.Random(f"{seed}:ft:{name}"), heldout),
            max_steps=spec.ft_steps,
            lr=spec.ft_lr,
            batch_size=spec.ft_batch,
        )
        ft_sds.append({k: v.detach().clone() for k, v in ft.state_dict().items()})
        _save_model(ft, tokenizer, tmp / name, spec)
        models[name] = name

    say("verifying: greedy exact match on the test split")
    table: dict[str, dict[str, float]] = {}

    def test_scores(m) -> dict[str, float]:
        return {t: exact_match(m, codec, splits[t]["test"], spec.max_gen_toks) for t in finetunes}

    table["base"] = test_scores(model)
    for name, sd in zip(finetunes, ft_sds):
        model.load_state_dict(sd)
        table[name] = test_scores(model)
    for lam in VERIFY_LAMBDAS:
        model.load_state_dict(_merged_state(base_sd, ft_sds, lam))
        table[f"task_arithmetic(lambda={lam})"] = test_scores(model)
    model.load_state_dict(base_sd)
    _save_model(model, tokenizer, tmp / "base", spec)
    info["verification"] = {"table": table, **verify(table, finetunes)}
    return info

"""Stream a merge to disk: tensor by tensor, bounded memory, atomic output directory.

Jobs run on a thread pool (torch kernels and positional file writes release the
GIL); at most a few jobs are in flight, so peak memory is set by the tensors
being merged, not by the model size: about 28 bytes per entry of each tensor in
flight for TIES of bf16 models (the inputs, float32 task vectors, the selection's
workspace), which makes a large vocabulary's embedding the peak (see
docs/merging.md). The output directory is built under a temp name and renamed
only when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from evomerge.device import check_device
from evomerge.errors import EvomergeError, prefixed
from evomerge.fsutil import atomic_dir, check_replaceable
from evomerge.io.writer import StreamingShardWriter, TensorSlot, parse_size
from evomerge.materialize.plan import MergePlan, TensorJob, model_path, open_models, plan_merge
from evomerge.recipe import Recipe
from evomerge.zoo.registry import ZOO_PREFIX

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
#: files that hold a tokenizer's vocabulary (fast, sentencepiece, BPE): a tokenizer source needs one
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
RECIPE_FILE = "mergekit_config.yml"


def job_seed(seed: int, out_name: str) -> int:
    """Per-tensor seed: random masks do not depend on thread scheduling or job order."""
    digest = hashlib.sha256(f"{seed}:{out_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def run_job(plan: MergePlan, job: TensorJob, device: str = "cpu", seed: int = 0):
    """Compute one output tensor on ``device``, in the job's dtype."""
    import torch

    compute = getattr(torch, plan.recipe.dtype) if plan.recipe.dtype else None

    def load(ref: tuple[str, str]):
        t = plan.models[ref[0]].tensor(ref[1]).to(device)
        return t.to(compute) if compute is not None else t

    base = load(job.base) if job.base else None
    tensors = [load(ref) for ref in job.sources]
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=device).manual_seed(job_seed(seed, job.out_name))
    try:
        out = plan.method.run(base, tensors, job.kwargs, generator)
    except ValueError as exc:
        raise EvomergeError(f"{job.out_name}: {exc}") from None
    return out.to(getattr(torch, job.dtype))


def model_card(recipe: Recipe) -> str:
    """README.md for the model merged from ``recipe``: front matter, the method, the sources, the recipe."""
    lines = ["---"]
    if recipe.base_model:
        lines.append(f"base_model: {json.dumps(recipe.base_model)}")
    lines += ["library_name: transformers", "tags:", "- merge", "- evomerge", "- mergekit", "---", ""]
    lines += ["# Merged model", "", f"Made with evomerge using **{recipe.merge_method}**.", ""]
    lines += ["## Source models", ""] + [f"- `{m}`" for m in recipe.referenced_models()] + [""]
    lines += ["## Recipe", "", "Reproduce with `evomerge merge` (or mergekit's `mergekit-yaml`):", "", "```yaml"]
    lines += [recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def tokenizer_dir(plan: MergePlan, base_dir: Path | None = None) -> Path:
    """The directory whose tokenizer files the merged model gets (``tokenizer_source``), checked before merging.

    A source named explicitly must hold a tokenizer: a model written without
    one would load in transformers but not in the lm-eval CLI.
    """
    src = plan.recipe.tokenizer_source
    if src in (None, "base"):
        return plan.models[plan.reference].path
    if src == "union":
        files = {m: d.path / "tokenizer.json" for m, d in plan.models.items()}
        lacking = [m for m, f in files.items() if not f.exists()]
        if lacking:
            raise EvomergeError(f"tokenizer_source: union: {lacking[0]} has no tokenizer.json")
        if len({f.read_bytes() for f in files.values()}) > 1:
            raise EvomergeError("tokenizer_source: union of different tokenizers is not supported; name one model")
        return plan.models[plan.reference].path
    source = plan.models[src].path if src in plan.models else model_path(src, base_dir)
    if not source.is_dir():
        raise EvomergeError(f"tokenizer_source {src!r}: not 'base', 'union' or a model directory")
    if not any((source / name).exists() for name in VOCABULARY_FILES):
        raise EvomergeError(f"tokenizer_source {src!r}: {source} holds no tokenizer ({', '.join(VOCABULARY_FILES)})")
    return source


def merge_to_dir(
    recipe: Recipe,
    out_dir: Path,
    *,
    force: bool = False,
    device: str = "cpu",
    threads: int = 2,
    seed: int | None = None,
    allow_pickle: bool = False,
    max_shard_size: str | int = "5GB",
    recipe_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    finalize: Callable[[Path], None] | None = None,
    inputs: Sequence[Path] = (),
) -> Path:
    """Merge ``recipe`` into an HF model directory at ``out_dir``.

    Everything is validated before writing. ``out_dir`` is replaced only with
    ``force`` and only once the new model is complete. ``seed`` (or the recipe's
    ``random_seed``, else 0) drives DARE/DELLA masks per tensor. ``progress`` is
    called with (tensors done, total). ``finalize`` gets the complete temp
    directory before it is renamed into place (e.g. to score the model and add
    the scores), so a failure there leaves nothing half-written either.
    ``inputs`` (the config, a run directory) and the recipe's models are never
    inside a replaced ``out_dir`` (``fsutil.check_replaceable``); the first
    input names the recipe in error messages.
    """
    import torch

    from evomerge.perf import keep_freed_memory

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise EvomergeError(f"{out_dir}: already exists; pass --force to replace it")
    check_device(device)
    models = open_models(recipe, allow_pickle=allow_pickle, base_dir=recipe_dir)
    where = str(inputs[0]) if inputs else None
    plan = plan_merge(recipe, models, where=where or "recipe")
    # the recipe written with the model is reproducible from any directory: its models as found (zoo
    # references stay: they name the same model on any machine)
    saved = recipe.with_models({name: str(d.path.resolve()) for name, d in models.items()
                                if not name.startswith(ZOO_PREFIX)})
    with prefixed(where):
        tokenizer = tokenizer_dir(plan, recipe_dir)
    if recipe.tokenizer_source not in (None, "base", "union", *models):
        # a directory of its own: as found, like the models, so the saved recipe works from anywhere
        saved = saved.model_copy(update={"tokenizer_source": str(tokenizer.resolve())})
    if out_dir.exists():
        check_replaceable(out_dir, [*inputs, *(m.path for m in models.values()), tokenizer])
    seed = seed if seed is not None else (recipe.random_seed or 0)
    if plan.method.random and saved.random_seed != seed:
        saved = saved.model_copy(update={"random_seed": seed})  # the masks drawn: the saved recipe redraws them
    slots = [TensorSlot(j.out_name, j.shape, j.dtype) for j in plan.jobs]
    max_bytes = parse_size(max_shard_size)
    keep_freed_memory()
    old_threads = torch.get_num_threads()
    with atomic_dir(out_dir.resolve(), replace=force) as tmp:
        writer = StreamingShardWriter(tmp, slots, max_bytes)
        # Parallelism comes from the job pool; one intra-op thread per job avoids oversubscription.
        torch.set_num_threads(1)
        try:
            with prefixed(where):
                run_jobs(plan, lambda job, out: writer.write(job.out_name, _checked(plan, job, out)), device=device,
                         seed=seed, threads=max(1, threads), progress=progress)
            writer.close({"merged_by": "evomerge"})
        except BaseException:
            writer.abort()
            raise
        finally:
            torch.set_num_threads(old_threads)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (tokenizer / name).exists():
                shutil.copy2(tokenizer / name, tmp / name)
        (tmp / RECIPE_FILE).write_text(saved.to_yaml())
        (tmp / "README.md").write_text(model_card(saved))
        if finalize is not None:
            finalize(tmp)
    return out_dir


def all_finite(t) -> bool:
    """No NaN or Inf in ``t``. A sum is finite only when every entry is (one fast pass); a finite
    tensor whose sum overflows is told apart by the exact check."""
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _checked(plan: MergePlan, job: TensorJob, out):
    """``out``, unless it holds NaN or Inf: then an error naming the tensor and the inputs at fault.

    A NaN in one source spreads to the merged tensor (and to every output of
    the model); the merged file would load and compute nothing useful.
    """
    if all_finite(out):
        return out
    refs = [r for r in (job.base, *job.sources) if r is not None]
    bad = [f"{model}:{name}" for model, name in refs if not all_finite(plan.models[model].tensor(name))]
    cause = (f"non-finite values in {', '.join(bad)}" if bad
             else f"the inputs are finite: the merge overflows {job.dtype}")
    raise EvomergeError(f"{job.out_name}: the merged tensor holds NaN or Inf values ({cause})")


def run_jobs(plan: MergePlan, sink: Callable[[TensorJob, object], None], *, device: str = "cpu", seed: int = 0,
             threads: int = 1, progress: Callable[[int, int], None] | None = None) -> None:
    """Compute every job of ``plan`` on a thread pool and hand each result to ``sink``.

    At most ``2 * threads`` jobs are in flight, so memory stays bounded; the
    first failure is raised after the pool stops.
    """
    total = len(plan.jobs)
    done = 0
    window = 2 * threads

    def work(job: TensorJob) -> None:
        with prefixed(job.out_name):  # a kernel's error (say, linear weights summing to 0) names the tensor
            out = run_job(plan, job, device, seed)
        sink(job, out)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
        pending: set[Future] = set()
        jobs = iter(plan.jobs)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < window:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                pending.add(pool.submit(work, job))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
                done += 1
                if progress is not None:
                    progress(done, total)

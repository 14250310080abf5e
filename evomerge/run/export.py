"""Export a run's chosen candidate: merged HF directory, mergekit recipe, test-split scores.

The candidate's recipe is streamed through the merge engine (the same code as
`evomerge merge`), then the finished directory is loaded with transformers and
scored with the run's evaluators on the *test* split, so the model card reports
numbers the search never optimized on. Everything happens in a temp directory
renamed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.run.rundir import Evaluation, RunDir
from evomerge.run.runner import ranked

#: The recipe beside the weights, in mergekit's YAML (`mergekit-yaml recipe.yaml OUT` rebuilds the model).
RECIPE_YAML = "recipe.yaml"
SCORES = "scores.json"


def choose(run: RunDir, rank: int | None = None, candidate: int | None = None) -> Evaluation:
    """The evaluation of ``run`` to export: candidate id ``candidate``, or the ``rank``-th best successful one
    (1 = best, ``runner.rank_key``; the default).

    Reads the journal as ``status`` does: lines that do not parse (a line being
    written, a damaged one) are skipped, not fatal; only resume needs them all.
    """
    return _chosen(run, rank, candidate)[0]


def _chosen(run: RunDir, rank: int | None, candidate: int | None) -> tuple[Evaluation, list[Evaluation]]:
    """``choose``'s evaluation and the run's successful ones, best first, from one read of the journal."""
    if rank is not None and candidate is not None:
        raise EvomergeError("give --rank or --id, not both")
    journal = run.readable_journal()[0]
    best = ranked(journal, run.space().objective.directions)
    if candidate is not None:
        found = next((e for e in journal if e.id == candidate), None)
        if found is None:
            raise EvomergeError(f"--id {candidate}: {run.path} has journaled no candidate #{candidate}")
        if not found.recipe:
            raise EvomergeError(f"--id {candidate}: candidate #{candidate} has no recipe ({found.error})")
        return found, best
    rank = 1 if rank is None else rank
    if not best:
        raise EvomergeError(f"{run.path}: no successful evaluation yet")
    if rank < 1:
        raise EvomergeError(f"--rank {rank}: ranks start at 1 (the best)")
    if rank > len(best):
        raise EvomergeError(f"--rank {rank}: {run.path} has {len(best)} successful evaluations")
    return best[rank - 1], best


def score_dir(path: Path, evaluators: list[dict], failures: dict[str, str] | None = None) -> dict[str, float]:
    """Metrics of the HF model at ``path`` under ``evaluators`` plus the built-in ones (loaded as transformers would).

    With ``failures``, an evaluator that cannot score the model (say, an
    lm-eval task without a test split) is recorded there (label -> why) and
    the others still run; without, its error is raised.
    """
    import torch

    from evomerge.evaluation.objective import builtin_metrics, evaluator_label
    from evomerge.evaluation.registry import build_evaluator
    from evomerge.io.live import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, device)
    tokenizer = load_tokenizer(path)
    metrics = builtin_metrics(model)
    for spec in evaluators:
        try:
            evaluator = build_evaluator(spec)
            evaluator.setup(model, tokenizer)
            metrics.update(evaluator(model, tokenizer))
        except EvomergeError as exc:
            if failures is None:
                raise
            failures[evaluator_label(spec)] = str(exc)
    return metrics


def export_run(run: RunDir, out: Path, *, rank: int | None = None, candidate: int | None = None,
               force: bool = False, score: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Write the chosen candidate (``choose``) to ``out``; returns the scores written to ``scores.json``.

    Their ``rank`` is the candidate's among the successful ones, None for one
    that failed or was screened out (its ``status`` says which).
    """
    from evomerge.materialize.export import merge_to_dir
    from evomerge.recipe import Recipe

    say = progress or (lambda msg: None)
    space = run.space()
    chosen, best = _chosen(run, rank, candidate)
    recipe = Recipe.model_validate(chosen.recipe)
    its_rank = next((r for r, e in enumerate(best, 1) if e.id == chosen.id), None)  # None: not a full success
    scores: dict = {"candidate": chosen.id, "rank": its_rank, "genes": chosen.genes,
                    "validation": {"metrics": chosen.metrics}}
    if its_rank is not None:
        scores["validation"]["fitness"] = dict(zip(space.objective.names, chosen.fitness))
    else:
        scores["status"] = "screened" if chosen.screened else chosen.status

    def finalize(tmp: Path) -> None:
        (tmp / RECIPE_YAML).write_text(recipe.to_yaml())
        if score:
            say(f"scoring candidate #{chosen.id} on the test split")
            unscored = {label: "no test split (it names no test_path)" for label in space.objective.untested()}
            metrics = score_dir(tmp, space.objective.for_split("test"), unscored)
            scores["test"] = {"metrics": metrics}
            if unscored:
                scores["test"]["unscored"] = unscored
            try:
                scores["test"]["fitness"] = dict(zip(space.objective.names, space.objective.values(metrics)))
            except KeyError:
                pass  # a fitness built on a metric only the validation evaluators give
        (tmp / SCORES).write_text(json.dumps(scores, indent=2) + "\n")
        with open(tmp / "README.md", "a") as card:
            card.write(_scores_section(run, chosen, scores))

    say(f"merging candidate #{chosen.id}")
    merge_to_dir(recipe, out, force=force, finalize=finalize, inputs=[run.path, *_used_by_sibling_stages(run)])
    return scores


def _used_by_sibling_stages(run: RunDir) -> list[Path]:
    """The models that the other stages of ``run``'s staged run are built on (stage 2 merges ``stage1/best``):
    an export must not replace them under results that were scored with them."""
    parent = RunDir(run.path.parent)
    if not parent.config_file.is_file():
        return []
    used = []
    for config in parent.path.glob("*/config.yaml"):
        if config.parent != run.path:
            models = RunDir(config.parent).space().models
            used += [Path(models.base), *map(Path, models.sources)]
    return used


def _scores_section(run: RunDir, chosen: Evaluation, scores: dict) -> str:
    lines = ["## Search", "", f"Candidate #{chosen.id} of run `{run.path.name}` (evomerge search).", ""]
    if scores.get("status"):  # exported by id: a candidate the search did not score in full
        lines += [f"In the search: {'screened out by the surrogate' if chosen.screened else chosen.status}"
                  + (f" ({chosen.error})" if chosen.error else "") + "; no validation score.", ""]
    lines += ["| metric | validation (searched on) | test |", "|---|---|---|"]
    test = scores.get("test", {}).get("metrics", {})
    for name in sorted(set(chosen.metrics) | set(test)):
        val = chosen.metrics.get(name)
        lines.append(f"| {name} | {'' if val is None else f'{val:.4f}'} | "
                     f"{'' if name not in test else f'{test[name]:.4f}'} |")
    unscored = scores.get("test", {}).get("unscored", {})
    if unscored:
        lines += ["", "Not scored on the test split:", ""] + [f"- {label}: {why}" for label, why in unscored.items()]
    return "\n".join(lines) + "\n"

"""The `evomerge` command line: a thin layer over the library.

Heavy libraries are imported inside commands so `evomerge --help` is instant.
Library errors (EvomergeError) are printed as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evomerge.errors import EvomergeError, prefixed

app = typer.Typer(
    help="Evolutionary model-merge search: evolve mergekit recipes, score them with lm-eval, export the best.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(
    help="Small local model families (built offline) for demos, tests and benchmarks.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True, log_path=False)
out_console = Console()


@zoo_app.command("build")
def zoo_build(
    kind: str = typer.Argument(..., help="Zoo kind: 'lm' (Llama base + task fine-tunes) or 'vision' (ViT + digit-image task fine-tunes, for AdaMerging)."),
    size: str = typer.Option("small", "--size", help="tiny (seconds, tests), small (demo, minutes), medium (~250M params, benchmarks)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Target directory (default: $EVOMERGE_CACHE/zoo/KIND-SIZE-seedN)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed for data, initialisation and training."),
    force: bool = typer.Option(False, "--force", help="Replace a zoo of a different spec, or a damaged one, at --out (never a non-zoo directory, nor one holding files a build did not write)."),
) -> None:
    """Build a model zoo locally, deterministically and without hub access.

    Skips the work when --out already holds a zoo with the same spec and seed.
    Builds into a temp dir that is renamed at the end, so an interrupted build
    leaves nothing behind. Prints the zoo's own verification table.
    """
    from evomerge.zoo import build_zoo

    with console.status(f"building {kind} zoo ({size})") as status:

        def progress(msg: str) -> None:
            status.update(msg)
            console.log(msg)

        info = build_zoo(kind, size, out, seed=seed, force=force, progress=progress)
    manifest = info.manifest
    console.print(f"zoo ready at [bold]{info.path}[/] (built in {manifest.get('build_seconds', '?')} s)")
    verification = manifest.get("verification")
    if verification and manifest.get("kind") == "vision":
        _print_table("build verification: accuracy on the test split (each task with its own head)",
                     verification["table"], manifest["finetune_tasks"])
        gains = ", ".join(f"{t} {g:+.3f}" for t, g in verification["finetune_gain"].items())
        out_console.print(f"fine-tune gain over the pre-trained encoder on own task: {gains}")
    elif verification:
        _print_table(
            "build verification: greedy exact match, test split",
            verification["table"],
            manifest["finetune_tasks"],
        )
        _print_verdict(verification)
    out_console.print(str(info.path))


@zoo_app.command("check")
def zoo_check(
    path: Optional[Path] = typer.Argument(None, help="Zoo directory (default: the lm zoo of --size/--seed in the cache)."),
    size: str = typer.Option("small", "--size", help="Zoo size when PATH is not given."),
    seed: int = typer.Option(0, "--seed", help="Zoo seed when PATH is not given."),
    split: str = typer.Option("test", "--split", help="'test' (reports) or 'validation' (what search optimizes)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N items of each task."),
    batch_size: int = typer.Option(64, "--batch-size", help="lm-eval batch size."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON to this file."),
) -> None:
    """Score the zoo's models and simple merges with real lm-eval runs.

    Prints per-model per-task exact match for the base, each fine-tune, task
    arithmetic at several lambdas and TIES, and whether the zoo's contract holds:
    each fine-tune beats the base by >= 20 points on its own task, and some
    merge beats every single source model on the task average. Exits 1 if not.
    """
    from evomerge.fsutil import check_writable_parent
    from evomerge.zoo import default_zoo_dir, load_zoo
    from evomerge.zoo.check import check_zoo

    if split not in ("test", "validation"):
        raise EvomergeError(f"--split must be 'test' or 'validation', not {split!r}")
    if json_out is not None:  # before the scoring, not after it
        if json_out.is_dir():
            raise EvomergeError(f"--json {json_out}: is a directory; give a file name")
        if not json_out.parent.is_dir():
            raise EvomergeError(f"--json {json_out}: its folder {json_out.parent} does not exist")
        check_writable_parent(json_out)
    zoo = load_zoo(path if path is not None else default_zoo_dir("lm", size, seed))
    if zoo.manifest.get("kind") != "lm":
        raise EvomergeError(f"{zoo.path}: a {zoo.manifest.get('kind')} zoo; zoo check scores LM zoos "
                            "(the vision zoo's checks are in benchmarks/adamerging_table.py)")
    with console.status("scoring with lm-eval") as status:
        result = check_zoo(zoo, split=split, limit=limit, batch_size=batch_size, progress=status.update)
    _print_table(f"lm-eval exact match, {split} split", result.table, result.tasks)
    _print_verdict(result.verdict)
    if json_out is not None:
        json_out.write_text(json.dumps({"split": split, "table": result.table, "verdict": result.verdict}, indent=2))
    raise typer.Exit(0 if result.verdict["passed"] else 1)


@app.command("merge")
def merge(
    config: Path = typer.Argument(..., help="mergekit-style merge YAML (a Recipe)."),
    out_dir: Path = typer.Argument(..., help="Output Hugging Face model directory."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists (only after the new model is complete)."),
    device: str = typer.Option("cpu", "--device", help="Where the arithmetic runs: cpu or cuda."),
    threads: int = typer.Option(2, "--threads", min=1, help="Tensors merged in parallel."),
    seed: Optional[int] = typer.Option(None, "--seed", "--random-seed", min=0, max=2**32 - 1, help="Seed for DARE/DELLA masks (default: the recipe's random_seed, else 0; written to the saved recipe)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Cut output shards at this size."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read pickle *.bin checkpoints (can run code; only for sources you trust)."),
) -> None:
    """Merge models as CONFIG says and write the result to OUT_DIR.

    Reads mergekit's YAML unchanged (merge_method, base_model, models or slices,
    parameters with gradients and filters, dtype, out_dtype, tokenizer_source).
    Streams tensor by tensor with bounded memory and writes sharded safetensors,
    config.json, the tokenizer, the recipe and a model card, into a temp
    directory renamed at the end. Methods: linear, slerp, task_arithmetic, ties,
    dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
    model_stock, passthrough.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from evomerge.materialize.export import merge_to_dir
    from evomerge.recipe import Recipe

    recipe = Recipe.from_file(config)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("merging tensors", total=None)
        with _atomic_output(out_dir):
            merge_to_dir(
                recipe, out_dir, force=force, device=device, threads=threads, seed=seed,
                allow_pickle=allow_pickle, max_shard_size=max_shard_size, recipe_dir=config.parent,
                progress=lambda done, total: bar.update(task, completed=done, total=total), inputs=[config],
            )
    console.print(f"merged model written to [bold]{out_dir}[/]")


@app.command("adamerge")
def adamerge_cmd(
    config: Path = typer.Argument(..., help="AdaMerging YAML: base_model, tasks (model + unlabeled data), settings."),
    out_dir: Path = typer.Argument(..., help="Output Hugging Face model directory."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this search run's best recipe (refine an evolved merge)."),
    granularity: Optional[str] = typer.Option(None, "--granularity", help="task, layer or tensor (overrides the config)."),
    plus_plus: Optional[bool] = typer.Option(None, "--plus-plus/--no-plus-plus", help="AdaMerging++: TIES-trimmed task vectors."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Adam steps (overrides the config)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (overrides the config)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**32 - 1, help="Seed of the batch sampling (overrides the config)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists (only after the new model is complete)."),
) -> None:
    """Learn merge coefficients by entropy minimisation (AdaMerging) and export the merge.

    Task vectors of the tasks' fine-tuned models are merged onto the base with
    one coefficient per task (task-wise), per task and layer (layer-wise) or
    per task and tensor, trained with Adam to minimise the merged model's
    prediction entropy on each task's unlabeled inputs; no labels are used.
    Writes the merged model, its mergekit recipe (mergekit_config.yml) and
    adamerging.json (coefficients, entropy before/after, losses).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.adamerging.config import AdaMergingConfig
    from evomerge.adamerging.export import adamerge_to_dir

    cfg = AdaMergingConfig.from_file(config).with_settings(
        granularity=granularity, plus_plus=plus_plus, steps=steps, lr=lr, seed=seed)
    if out_dir.exists() and not force:
        raise EvomergeError(f"{out_dir}: already exists; pass --force to replace it")
    with console.status("resolving models") as status, prefixed(str(config)):
        cfg = cfg.resolved(relative_to=config.parent, progress=status.update)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        bars: dict[str, int] = {}

        def progress(phase: str, done: int, total: int, loss: float) -> None:
            if phase not in bars:
                bars[phase] = bar.add_task(phase, total=total, info="")
            bar.update(bars[phase], completed=done, total=total,
                       info=f"entropy {loss:.4f}" if phase == "training" else "")

        with _atomic_output(out_dir):
            result = adamerge_to_dir(cfg, out_dir, init_run=init, force=force, device=device, progress=progress,
                                     inputs=[config])
    grid = Table(title=f"{cfg.granularity}-wise AdaMerging{'++' if cfg.plus_plus else ''} coefficients")
    for col in ("task", "mean", "min", "max"):
        grid.add_column(col, justify="right" if col != "task" else "left")
    for task, row in zip(cfg.tasks, result.coefficients):
        grid.add_row(task.label, f"{row.mean():.3f}", f"{row.min():.3f}", f"{row.max():.3f}")
    out_console.print(grid)
    out_console.print(f"mean entropy per task: {result.initial_entropy:.4f} at the start, {result.final_entropy:.4f} learned")
    if result.stopped:
        console.print(f"[yellow]stopped early:[/] {result.stopped}")
    console.print(f"merged model written to [bold]{out_dir}[/]")


@contextlib.contextmanager
def _atomic_output(out_dir: Path):
    """Ctrl-C while writing ``out_dir`` says what it left (nothing: outputs appear whole) instead of
    exiting without a word, as typer would."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: nothing was written to {out_dir}"
                      + (" (it is as it was)" if out_dir.exists() else ""), highlight=False)
        raise typer.Exit(130) from None


def _end_live_line() -> None:
    if not console.is_terminal:
        console.line()  # rich leaves a non-terminal live display's last line open


def _make_executor(workers: int | None, address: str | None, local: bool):
    """Executor factory for the runner: Ray actors (default) or this process (--local)."""
    from evomerge.run.executor import LocalExecutor, RayExecutor

    def factory(space):
        data = space.model_dump(mode="json")
        if local:
            return LocalExecutor(data, device=space.device)
        return RayExecutor(data, workers or space.workers, address=address, device=space.device)

    return factory


def _drive(run_dir: Path, workers: int | None, address: str | None, local: bool, export: bool) -> None:
    """Run (or continue) the search in ``run_dir`` with a live display, then export the best model."""
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.console import Group

    from evomerge.run.export import export_run
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import Runner
    from evomerge.run.staged import run_stages

    if local and address:
        raise EvomergeError(f"--address {address} names a Ray cluster, but --local evaluates in this process; "
                            "give one of them")
    run = RunDir.open(run_dir)
    space = run.space()
    asked = workers or space.workers
    if local and asked > 1:
        console.print(f"[yellow]note:[/] --local evaluates in this process, one candidate at a time; "
                      f"{asked} workers need Ray (leave out --local)")
    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task("starting workers (loading models and evaluators)", total=None)
    live = Live(Group(bar), console=console, refresh_per_second=4, transient=False)

    def show(p) -> None:
        best = "—" if p.best is None else f"{p.best.fitness[0]:.4f} (#{p.best.id})"
        bar.update(task, completed=p.done, total=p.total,
                   description=f"best {best} · {p.evals_per_min:.1f} evals/min · failed {p.failed}"
                   + (f" · screened {p.screened}" if p.screened else ""))
        states = "  ".join(f"w{w}: {s}" for w, s in sorted(p.workers.items()))
        live.update(Group(bar, f"[dim]{states}[/]", *([f"[dim]{p.memory}[/]"] if p.memory else [])))

    factory = _make_executor(workers, address, local)

    def make_runner(stage_run):
        return Runner(stage_run, factory, on_event=show)

    def on_stage(index, stage_run):
        console.print(f"stage {index + 1} ({'parameter' if index == 0 else 'data-flow'}): {stage_run.path}")

    staged = space.genome.type == "staged"
    try:
        with live:
            if staged:
                run_for_export, progress = run_stages(run, make_runner, on_stage)
            else:
                run_for_export, progress = run, make_runner(run).run()
    except KeyboardInterrupt:
        _end_live_line()
        console.print(f"[yellow]interrupted[/]; nothing finished is lost. Continue with: evomerge resume {run_dir}")
        raise typer.Exit(130) from None
    except OSError as exc:  # a full disk, say: the journal and state are written whole or not at all
        _end_live_line()
        raise EvomergeError(f"{_os_error(exc)}; nothing finished is lost: once that is fixed, "
                            f"`evomerge resume {run_dir}` continues") from None
    except Exception:
        _end_live_line()  # the error goes on a line of its own
        raise
    _end_live_line()
    best = progress.best
    console.print(("data-flow stage: " if staged else "") + f"{progress.done} evaluations, {progress.failed} failed"
                  + (f", {progress.screened} screened out" if progress.screened else "") + "; "
                  + ("no successful candidate" if best is None else f"best #{best.id}: fitness {_fitness(best.fitness)}"))
    if best is None and progress.failed:
        # every candidate failed: most likely one misconfiguration; show it rather than exit 0
        last = next((e for e in reversed(run_for_export.journal()) if not e.ok), None)
        raise EvomergeError(f"all {progress.failed} candidates failed" + (f"; the last with: {last.error}" if last else "")
                            + f" (`evomerge status {run_dir}` lists them)")
    if export and best is not None:
        try:
            with console.status("exporting the best candidate") as status:
                scores = export_run(run_for_export, run.best_dir, force=True, progress=status.update)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/] while exporting; the search itself is complete. "
                          f"Export its best with: evomerge resume {run_dir}")
            raise typer.Exit(130) from None
        _exported(f"best model exported to [bold]{run.best_dir}[/]", scores)
    out_console.print(str(run.path))


def _warn_unreadable(run) -> list:
    """``run``'s readable journal, saying which lines were skipped (damaged, half-written or repeated)."""
    from evomerge.report.runs import format_line_numbers

    journal, unreadable = run.readable_journal()
    if unreadable:
        console.print(f"[yellow]skipped {len(unreadable)} unreadable journal line(s)[/] "
                      f"({format_line_numbers(unreadable)}) of {run.journal_file}", soft_wrap=True, highlight=False)
    return journal


def _fitness(values) -> str:
    """A fitness vector (a list, or a dict by objective) for the terminal: 4 significant digits."""
    if isinstance(values, dict):
        return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in values.items()) + "}"
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _exported(what: str, scores: dict) -> None:
    """Say where an export went, its test-split fitness, and which evaluators could not score the test split."""
    test = scores.get("test", {})
    console.print(what + (f" (test split: {_fitness(test['fitness'])})" if test.get("fitness") else ""))
    for label, why in test.get("unscored", {}).items():
        console.print(f"[yellow]not scored on the test split[/]: {label}: {why}")


@app.command("search")
def search(
    space_file: Path = typer.Argument(..., help="Search-space YAML (see search_spaces/)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory to create (default: runs/NAME, NAME from the space)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Evaluations to run (overrides the space)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel workers, each holding the models (overrides the space)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Ray cluster (auto, or HOST:PORT of its head; ray://HOST:10001 needs ray[client]) instead of starting a local one."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**32 - 1, help="Seed of the optimizer and of DARE masks (overrides the space)."),
    local: bool = typer.Option(False, "--local", help="Evaluate in this process, one worker, without Ray (debugging)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (budget, optimizer, objective, run directory), the genes with their bounds and layer groups, and a decoded example; then stop."),
    export: bool = typer.Option(True, "--export/--no-export", help="Export the best model to RUN_DIR/best when done."),
) -> None:
    """Evolve merge recipes over a search space and export the best merged model.

    Resolves the space's models (building zoo: models on first use), freezes the
    resolved space into RUN_DIR/config.yaml, then asks the optimizer for
    candidates, merges each in place on a worker, scores it with the
    objective's evaluators and journals it. Interrupt any time (Ctrl-C, a crash,
    kill -9): `evomerge resume RUN_DIR` continues without losing or repeating
    finished evaluations.
    """
    from evomerge.run.rundir import RunDir
    from evomerge.spaces.space import SearchSpace

    space = SearchSpace.from_file(space_file).with_overrides(budget=budget, workers=workers, seed=seed)
    with console.status("resolving models") as status:
        with prefixed(str(space_file)):
            space = space.resolved(relative_to=space_file.parent, progress=status.update)
        space.check(str(space_file))
    run_dir = run_dir or Path("runs") / space.name
    if dry_run:
        _print_plan(space, run_dir)
        return
    run = RunDir.create(run_dir, space)
    console.print(f"run directory [bold]{run_dir}[/]")
    try:
        with run.lock():
            _drive(run_dir, workers, address, local, export)
    except (EvomergeError, OSError):
        if not run.started:  # failed before any evaluation: leave no half-made run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@app.command("resume")
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory of an interrupted (or finished) search."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Raise the total number of evaluations."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel workers for the rest of the run."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Ray cluster instead of starting a local one."),
    local: bool = typer.Option(False, "--local", help="Evaluate in this process, one worker, without Ray."),
    export: bool = typer.Option(True, "--export/--no-export", help="Export the best model to RUN_DIR/best when done."),
) -> None:
    """Continue a search after any interruption, kill -9 included.

    Finished evaluations are read from the journal (never re-run); candidates
    that were in flight are evaluated again with the same genome and id.
    """
    from evomerge.run.rundir import RunDir

    run = RunDir.open(run_dir)
    with run.lock():
        run.check_unchanged()
        space = run.space()
        if budget is not None:
            if budget < space.budget:
                raise EvomergeError(f"--budget {budget} is below the run's budget {space.budget}; it can only grow")
            run.save_space(space.with_overrides(budget=budget))
        _drive(run_dir, workers, address, local, export)


@app.command("status")
def status(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    top: int = typer.Option(5, "--top", min=1, help="Best candidates to list."),
) -> None:
    """Show a run's progress: counts, failures and its best candidates.

    Reads only the config and the journal, so it is fast and works while the
    search is running; unreadable journal lines are skipped and counted.
    """
    from evomerge.report.series import pareto_mask
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import ranked
    from evomerge.run.staged import latest_run, stage_dir

    top_run = RunDir.open(run_dir)
    run = latest_run(top_run)
    space = run.space()
    journal = _warn_unreadable(run)
    failed = [e for e in journal if not e.ok]
    screened = sum(e.screened for e in journal)
    names = space.objective.names
    out_console.print(f"[bold]{run.path}[/]: {len(journal) - screened}/{space.budget} evaluations, {len(failed)} failed, "
                      + (f"{screened} screened out by the surrogate, " if screened else "")
                      + f"optimizer {space.optimizer.name}, genome {space.genome.type}; "
                      + ("a search is running in it now" if top_run.busy else "no search running"), soft_wrap=True)
    first = stage_dir(top_run, 0)
    if run.path not in (top_run.path, first.path):  # a staged run in its data-flow stage: the stage it came from
        first_space = first.space()
        done = ranked(first.journal(), first_space.objective.directions)
        out_console.print(f"stage 1 ({first.path}): {len(done)}/{first_space.budget} successful evaluations"
                          + (f", winner #{done[0].id} fitness {_fitness(done[0].fitness)}" if done else ""), soft_wrap=True)
    if not journal:
        out_console.print("no evaluations journaled yet; " + (
            "its search is starting" if run.busy else f"continue with: evomerge resume {run_dir}"), soft_wrap=True)
        return
    ranking = ranked(journal, space.objective.directions)
    several = len(names) > 1
    if ranking:
        # ranked as export picks "the best" (runner.rank_key); with several objectives, the Pareto front is marked
        grid = Table(title=f"best {min(top, len(ranking))} by {', then '.join(names)} (validation)"
                     + ("; ✓ = on the Pareto front" if several else ""))
        for col in ["rank", "id", *names, *(["Pareto"] if several else []), "decoder layers", "seconds"]:
            grid.add_column(col, justify="right")
        front = pareto_mask([e.fitness for e in ranking], space.objective.directions) if several else []
        for rank, e in enumerate(ranking[:top], 1):
            grid.add_row(str(rank), str(e.id), *(f"{v:.4f}" for v in e.fitness),
                         *(["✓" if front[rank - 1] else ""] if several else []),
                         f"{e.metrics.get('merge/num_layers', 0):.0f}", f"{e.seconds:.1f}")
        out_console.print(grid)
        if several:
            members = [f"#{e.id} (rank {rank})" for rank, (e, on) in enumerate(zip(ranking, front), 1) if on]
            out_console.print(f"Pareto front ({len(members)}): {', '.join(members)}; export one with "
                              f"evomerge export {run_dir} OUT --id N", soft_wrap=True, highlight=False)
    for e in failed[-3:]:
        out_console.print(f"[red]#{e.id} {e.status}[/]: {e.error}", soft_wrap=True, highlight=False)
    last_stage = run.path in (top_run.path, stage_dir(top_run, 1).path)
    if (ranking and last_stage and len(journal) - screened >= space.budget and not top_run.best_dir.exists()
            and not run.busy):
        out_console.print(f"the search is complete but its best is not exported to {top_run.best_dir}; "
                          f"evomerge resume {run_dir} exports it", soft_wrap=True, highlight=False)


@app.command("report")
def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories; several are overlaid in the progress plot."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: the first run's report/)."),
) -> None:
    """Write PNG plots and a Markdown summary (summary.md) of one or more runs.

    Plots, as they apply: fitness per evaluation and best so far over
    evaluations and wall time (runs overlaid); the best candidate's per-layer
    weights and densities (parameter genomes) or its layer path with scales
    (data-flow genomes); the Pareto front (several objectives); worker
    utilization and failures over time; surrogate vs full score (screening).
    Reads only config.yaml and journal.jsonl, also while a search runs;
    unreadable journal lines are skipped and counted. The run itself is never
    modified: the report is built in a temp directory and renamed into place.
    """
    from evomerge.report.build import write_report
    from evomerge.report.runs import format_line_numbers
    from evomerge.report.summary import SUMMARY

    with console.status("drawing plots"):
        report = write_report(run_dirs, out)
    for run in report.runs:
        if run.unreadable:
            console.print(f"[yellow]{run.run.journal_file}: skipped {len(run.unreadable)} unreadable line(s)[/] "
                          f"({format_line_numbers(run.unreadable)})", soft_wrap=True, highlight=False)
    for plot in report.plots:
        console.print(f"  {plot.file}" + ("" if plot.run is None else f" ({plot.run})"), highlight=False)
    console.print(f"report written to [bold]{report.out}[/] ({len(report.plots)} plots, {SUMMARY})")
    out_console.print(str(report.out / SUMMARY), soft_wrap=True, highlight=False)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    out_dir: Path = typer.Argument(..., help="Output Hugging Face model directory."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Which candidate by rank: 1 = best (the default), 2 = second best, ..."),
    candidate: Optional[int] = typer.Option(None, "--id", help="Which candidate by id (as status and the journal number them), failed ones included."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists (only after the new model is complete)."),
    score: bool = typer.Option(True, "--score/--no-score", help="Score the export on the test split for the model card."),
) -> None:
    """Export a run's candidate as a Hugging Face model directory.

    Writes the merged weights, config and tokenizer, recipe.yaml (mergekit
    format: `mergekit-yaml recipe.yaml OUT` rebuilds it), scores.json and a
    model card with validation and test-split scores.
    """
    from evomerge.run.export import export_run
    from evomerge.run.rundir import RunDir
    from evomerge.run.staged import latest_run

    run = latest_run(RunDir.open(run_dir))
    _warn_unreadable(run)
    with console.status("exporting") as st, _atomic_output(out_dir):
        scores = export_run(run, out_dir, rank=rank, candidate=candidate, force=force, score=score,
                            progress=st.update)
    _exported(f"candidate #{scores['candidate']} exported to [bold]{out_dir}[/]", scores)
    if scores.get("status"):
        console.print(f"[yellow]candidate #{scores['candidate']} has no score from the search "
                      f"({scores['status']})[/]: its recipe is exported as written", highlight=False)


def _print_plan(space, run_dir: Path) -> None:
    """``search --dry-run``: what would run (budget, optimizer, objective, run dir), the genome's genes and
    bounds, the layers of each group, and the recipe of the box centre."""
    import numpy as np

    from evomerge.evaluation.objective import evaluator_label

    staged = space.genome.type == "staged"
    settings = ", ".join(f"{k}={v}" for k, v in space.optimizer.settings.items())
    out_console.print(f"search {space.name}: {space.budget} evaluations, optimizer {space.optimizer.name}"
                      + (f" ({settings})" if settings else "") + f", seed {space.seed}, {space.workers} worker(s), "
                      f"run directory {run_dir}", soft_wrap=True, highlight=False)
    for f in space.objective.fitness:
        metrics = ", ".join(m if w == 1 else f"{w:g}×{m}" for m, w in f.metrics.items())
        out_console.print(f"objective: {f.direction} {f.name} = {f.aggregate} of {metrics}", soft_wrap=True,
                          highlight=False)
    for spec in space.objective.evaluators:
        settings = "; ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
                             for k, v in spec.items() if k not in ("type", "name"))
        out_console.print(f"evaluator {evaluator_label(spec)}: {settings}", soft_wrap=True, highlight=False,
                          markup=False)
    if space.surrogate:
        out_console.print(f"screening: {space.surrogate.direction} {', '.join(space.surrogate.metrics)}, the best "
                          f"{space.surrogate.keep:g} of each batch evaluated in full", soft_wrap=True, highlight=False)
    if staged:
        out_console.print(f"staged genome: stage 1 is a parameter search ({space.genome.parameter_budget} "
                          f"evaluations), stage 2 a data-flow search over its winner and the sources "
                          f"({space.budget - space.genome.parameter_budget} evaluations)", soft_wrap=True)
        genome = space.stage(0).build_genome()
    else:
        genome = space.build_genome()
    grid = Table(title=f"{'stage 1 ' if staged else ''}genome: {genome.dim} genes")
    for col in ("#", "gene", "low", "high"):
        grid.add_column(col)
    for i, g in enumerate(genome.genes):
        grid.add_row(str(i), escape(g.name), f"{g.low:g}", f"{g.high:g}")
    out_console.print(grid)
    groups = getattr(genome, "groups", None)
    if groups:
        out_console.print("layer groups: " + ", ".join(f"g{g} = {_ranges(layers)}" for g, layers in enumerate(groups)),
                          highlight=False)
    out_console.print("decoded example (every gene at 0.5):")
    out_console.print(genome.decode(np.full(genome.dim, 0.5)).to_yaml(), highlight=False, markup=False)


def _ranges(layers: list[int]) -> str:
    """``layers 0-1`` or ``layer 3`` for a run of consecutive layer indices."""
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def _print_table(title: str, table: dict[str, dict[str, float]], tasks: list[str]) -> None:
    grid = Table(title=title)
    grid.add_column("model")
    for t in tasks:
        grid.add_column(t, justify="right")
    grid.add_column("avg", justify="right")
    for model, row in table.items():
        # a fine-tune of the vision zoo is scored on its own task only
        avg = f"{sum(row[t] for t in tasks) / len(tasks):.3f}" if all(t in row for t in tasks) else ""
        grid.add_row(model, *(f"{row[t]:.3f}" if t in row else "" for t in tasks), avg)
    out_console.print(grid)


def _print_verdict(v: dict) -> None:
    gains = ", ".join(f"{t} {g:+.3f}" for t, g in v["finetune_gain"].items())
    ok = "[green]yes[/]" if v["finetunes_ok"] else "[red]NO[/]"
    out_console.print(f"fine-tune gain over base on own task: {gains} (all >= 0.20: {ok})")
    ok = "[green]yes[/]" if v["merge_beats_sources"] else "[red]NO[/]"
    out_console.print(
        f"best merge {v['best_merge']} avg {v['best_merge_avg']:.3f} vs best source "
        f"{v['best_source']} avg {v['best_source_avg']:.3f} (merge wins: {ok})"
    )


def _os_error(exc: OSError) -> str:
    """An OSError as one line: the file it is about, and what went wrong."""
    return (f"{exc.filename}: " if exc.filename else "") + (exc.strerror or str(exc))


def _fail(message: str) -> None:
    """Print one error line and exit 2."""
    # messages quote YAML such as [low, high], which rich would take for markup
    console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # lm-eval warns on every in-process model wrap, which evomerge does by design.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # The CLI shows its own rich progress; the libraries' tqdm bars would interleave with it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except EvomergeError as exc:
        _fail(str(exc))
    except OSError as exc:
        # a full disk or a vanished directory: outputs and run state are written atomically, so nothing
        # half-written is left, and a search continues with `evomerge resume` once the cause is fixed
        _fail(_os_error(exc))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()

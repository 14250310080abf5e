"""The `evomerge` command line: a thin layer over the library.

Heavy libraries are imported inside commands so `evomerge --help` is instant.
Library errors (EvomergeError) are printed as one line, without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from evomerge.errors import EvomergeError

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
    kind: str = typer.Argument(..., help="Zoo kind: 'lm' (Llama base + task fine-tunes)."),
    size: str = typer.Option("small", "--size", help="tiny (seconds, tests), small (demo, minutes), medium (~250M params, benchmarks)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Target directory (default: $EVOMERGE_CACHE/zoo/KIND-SIZE-seedN)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data, initialisation and training."),
    force: bool = typer.Option(False, "--force", help="Replace a zoo of a different spec at --out (never a non-zoo directory)."),
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
    if verification:
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
    from evomerge.zoo import default_zoo_dir, load_zoo
    from evomerge.zoo.check import check_zoo

    if split not in ("test", "validation"):
        raise EvomergeError(f"--split must be 'test' or 'validation', not {split!r}")
    zoo = load_zoo(path if path is not None else default_zoo_dir("lm", size, seed))
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
    threads: int = typer.Option(2, "--threads", help="Tensors merged in parallel."),
    seed: Optional[int] = typer.Option(None, "--seed", "--random-seed", help="Seed for DARE/DELLA masks (default: the recipe's random_seed, else 0)."),
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
        merge_to_dir(
            recipe, out_dir, force=force, device=device, threads=threads, seed=seed,
            allow_pickle=allow_pickle, max_shard_size=max_shard_size, recipe_dir=config.parent,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(f"merged model written to [bold]{out_dir}[/]")


def _print_table(title: str, table: dict[str, dict[str, float]], tasks: list[str]) -> None:
    grid = Table(title=title)
    grid.add_column("model")
    for t in tasks:
        grid.add_column(t, justify="right")
    grid.add_column("avg", justify="right")
    for model, row in table.items():
        avg = sum(row[t] for t in tasks) / len(tasks)
        grid.add_row(model, *(f"{row[t]:.3f}" for t in tasks), f"{avg:.3f}")
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


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The CLI shows its own rich progress; the libraries' tqdm bars would interleave with it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except EvomergeError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()

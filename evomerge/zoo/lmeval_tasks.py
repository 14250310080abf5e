"""Write the LM zoo's evaluation data and lm-eval task YAMLs.

For each task ``T`` the zoo gets ``zoo_T`` (scored on the *test* split, for
final reports) and ``zoo_T_val`` (scored on the *validation* split, for search),
plus the groups ``zoo`` and ``zoo_val`` averaging exact match over the tasks.
``lm_eval --include_path ZOO/tasks --tasks zoo`` runs them unchanged.

``zoo_T_choice`` / ``zoo_T_choice_val`` score the same documents as a
two-choice ``multiple_choice`` task (accuracy from two loglikelihood requests
per document: the answer against the answer with its first character
changed), the request shape of mergekit-evolve's benchmarks. They are derived
from the same data files, so zoos built before they existed gain them on load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import yaml

from evomerge.fsutil import write_bytes_atomic

SPLITS = ("validation", "test")
UNLABELED = "unlabeled.jsonl"
TASK_PREFIX = "zoo_"
CHOICE_SUFFIX = "_choice"
#: The answer and a distractor of the same length that differs in its first character.
CHOICES = "{{[answer, ('b' if answer[:1] == 'a' else 'a') ~ answer[1:]]}}"


def task_name(task: str, split: str = "test", *, choice: bool = False) -> str:
    """lm-eval task name of ``task`` scored on ``split``; ``choice``: its two-choice loglikelihood variant."""
    return f"{TASK_PREFIX}{task}" + (CHOICE_SUFFIX if choice else "") + ("_val" if split == "validation" else "")


def group_name(split: str = "test") -> str:
    """lm-eval group averaging all zoo tasks on ``split``."""
    return "zoo" + ("_val" if split == "validation" else "")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _dump(path: Path, data: dict) -> None:
    # atomic: a cached zoo's YAMLs are rewritten in place while other processes may be reading them
    write_bytes_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())


def write_task_files(
    tasks_dir: Path,
    data_root: Path,
    splits: dict[str, dict[str, list[tuple[str, str]]]],
    max_gen_toks: int,
) -> None:
    """Write JSONL data, task YAMLs and the unlabeled prompt file into ``tasks_dir``.

    ``splits[task][split]`` holds (prompt, answer) pairs for ``validation``,
    ``test`` and ``unlabeled``. ``data_root`` is where ``tasks_dir`` will finally
    live (the build writes into a temp dir that is renamed): the YAMLs name their
    data files by absolute path under it, because lm-eval resolves relative data
    paths against the working directory, not the YAML.
    """
    names = sorted(splits)
    for name in names:
        for split in SPLITS:
            _write_jsonl(
                tasks_dir / "data" / name / f"{split}.jsonl",
                ({"prompt": p, "answer": a} for p, a in splits[name][split]),
            )
    write_task_yamls(tasks_dir, data_root, names, max_gen_toks)
    _write_jsonl(
        tasks_dir / UNLABELED,
        ({"task": name, "prompt": p} for name in names for p, _ in splits[name]["unlabeled"]),
    )


def write_task_yamls(tasks_dir: Path, data_root: Path, names: list[str], max_gen_toks: int) -> None:
    """(Re)write the task and group YAMLs, pointing at data under ``data_root``."""
    for name in names:
        common = {
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {split: str(data_root / "data" / name / f"{split}.jsonl") for split in SPLITS}
            },
            "validation_split": "validation",
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            "target_delimiter": "",
        }
        generate = {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
        choice = {
            "output_type": "multiple_choice",
            "doc_to_choice": CHOICES,
            "doc_to_target": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        for variant, is_choice in ((generate, False), (choice, True)):
            main = task_name(name, choice=is_choice)
            _dump(tasks_dir / f"{main}.yaml", {"task": main, **common, **variant, "metadata": {"version": 1.0}})
            # The validation variant scores the validation split: lm-eval evaluates
            # test_split when it is set, so the variant drops it.
            val = task_name(name, "validation", choice=is_choice)
            _dump(tasks_dir / f"{val}.yaml", {"include": f"{main}.yaml", "task": val, "test_split": None})
    for split in SPLITS:
        _dump(
            tasks_dir / f"{group_name(split)}.yaml",
            {
                "group": group_name(split),
                "task": [task_name(n, split) for n in names],
                "aggregate_metric_list": [
                    {"metric": "exact_match", "aggregation": "mean", "weight_by_size": False}
                ],
                "metadata": {"version": 1.0},
            },
        )


def ensure_task_paths(tasks_dir: Path, names: list[str], max_gen_toks: int) -> None:
    """Rewrite the YAMLs when the zoo was moved (stale data paths) or predates the two-choice tasks."""
    main = tasks_dir / f"{task_name(names[0])}.yaml"
    config = yaml.safe_load(main.read_text())
    recorded = Path(config["dataset_kwargs"]["data_files"]["test"])
    stale = recorded != tasks_dir / "data" / names[0] / "test.jsonl"
    if stale or not (tasks_dir / f"{task_name(names[-1], 'validation', choice=True)}.yaml").exists():
        write_task_yamls(tasks_dir, tasks_dir, names, max_gen_toks)

"""Search spaces over the tiny zoo, shared by the search tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_space(zoo, tmp_path: Path, *, name: str = "tiny", budget: int = 6, optimizer: str = "cmaes",
               genome: dict | None = None, evaluators: list | None = None, fitness: list | None = None,
               **extra) -> Path:
    """Write a search-space YAML over the tiny zoo and return its path."""
    models = zoo.models
    space = {
        "name": name,
        "models": {"base": str(models["base"]), "sources": [str(models[m]) for m in ("copy", "rev", "sort")]},
        "genome": genome or {"type": "parameter", "method": "ties", "parameters": {"normalize": False}},
        "objective": {
            "evaluators": evaluators or [{
                "type": "lm_eval", "include_path": str(zoo.tasks_dir),
                "tasks": ["zoo_copy", "zoo_rev", "zoo_sort"], "limit": 16, "batch_size": 48,
            }],
            "fitness": fitness or [{
                "name": "exact_match", "direction": "maximize",
                "metrics": ["zoo_copy/exact_match", "zoo_rev/exact_match", "zoo_sort/exact_match"],
            }],
        },
        "optimizer": {"name": optimizer},
        "budget": budget,
        "seed": 0,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def comparable(journal) -> list[dict]:
    """Journal entries without what legitimately differs between runs (timings, worker, attempts)."""
    varying = ("seconds", "worker", "attempts", "started", "finished", "session")
    return [{k: v for k, v in vars(e).items() if k not in varying} for e in journal]

"""Load YAML into a pydantic model with errors that name the file, line and key at fault.

Shared by every YAML the user writes (merge recipes, search spaces), so all of
them report problems the same way: ``file: line N: key.path: message``.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import EvomergeError

M = TypeVar("M", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently:
    a second ``merge_method:`` further down would quietly win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


#: the top-level key that marks each kind of evomerge YAML, what that kind is, and the command that reads it
KINDS = {
    "merge_method": ("a merge config", "evomerge merge FILE OUT_DIR"),
    "genome": ("a search space", "evomerge search FILE"),
    "tasks": ("an AdaMerging config", "evomerge adamerge FILE"),
}


def parse_yaml(text: str, source: str, kind: str | None = None) -> dict:
    """Parse a YAML mapping, naming the line of a syntax error or of a key given twice.

    ``kind`` (a key of ``KINDS``): a file of another kind, say a merge config
    given to ``search``, is one message saying what it is and which command reads it.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise EvomergeError(f"{source}:{where} malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{source}: expected a mapping of settings at the top level")
    if kind is not None and kind not in data:
        for key, (what, command) in KINDS.items():
            if key != kind and key in data:
                raise EvomergeError(f"{source}: this is {what} (it has {key!r}), not {KINDS[kind][0]}; "
                                    f"run it with `{command}`")
    return data


def validate(cls: type[M], data: dict, text: str, source: str) -> M:
    """``cls.model_validate(data)`` with validation errors explained against ``text``."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise EvomergeError(explain(cls, exc, text, source)) from None


def read_text(path: str | Path) -> str:
    """A config file's text, with a one-line error when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise EvomergeError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise EvomergeError(f"{path}: not a text file (it is not UTF-8)") from None


def explain(cls: type[BaseModel], exc: ValidationError, text: str, source: str) -> str:
    """One line per problem (at most five): ``file: line N: key.path: message``."""
    lines = []
    for err in exc.errors()[:5]:
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tuple[")))]
        line = line_of(text, loc)
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; valid keys here: {', '.join(_valid_keys(cls, loc))}"
        lines.append(f"{source}:{f' line {line}:' if line else ''} {key}: {msg}")
    return "\n".join(lines)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models reachable through Optional/list/dict/Union/Annotated wrappers."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        args = args[:1]
    if origin in (dict,):
        args = args[1:]
    found = []
    for arg in args:
        found += _models_in(arg)
    return found if origin in (list, dict, typing.Union, types.UnionType, typing.Annotated, tuple) else []


def _valid_keys(cls: type[BaseModel], loc: list) -> list[str]:
    """Field names of the model that holds the unknown key at ``loc``."""
    current = [cls]
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue
        nxt = []
        for model in current:
            field = model.model_fields.get(part)
            if field is not None:
                nxt += _models_in(field.annotation)
        if not nxt:
            # a tagged union member (pydantic puts the tag in loc): keep the models whose tag matches
            tagged = [m for m in current if part in {str(getattr(m.model_fields.get("type"), "default", None))}]
            nxt = tagged or current
        current = nxt
    keys: list[str] = []
    for model in current:
        keys += [k for k in model.model_fields if k not in keys]
    return keys


def line_of(text: str, loc: list) -> int | None:
    """1-based line of the YAML node at ``loc`` (as deep as it exists)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                continue  # e.g. a union tag pydantic inserted into loc
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            continue
    return line


def with_overrides(model: M, overrides: dict[str, Any]) -> M:
    """A copy of ``model`` with CLI overrides (``None`` values ignored), validated again."""
    data = model.model_dump(mode="json")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return type(model).model_validate(data)
    except ValidationError as exc:
        # a model-level check has no key: name the overridden settings instead
        asked = ", ".join(k for k, v in overrides.items() if v is not None)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or asked}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors()[:3])
        raise EvomergeError(f"invalid override: {problems}") from None

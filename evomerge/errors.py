"""The one exception type that reaches users as a message instead of a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class EvomergeError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` and exits non-zero; the message names the file,
    key or tensor at fault so the user can act on it without a traceback.
    """


@contextlib.contextmanager
def prefixed(prefix: str | None) -> Iterator[None]:
    """Prefix an EvomergeError raised inside with ``prefix`` (the file or key it is about; None: as it is)."""
    try:
        yield
    except EvomergeError as exc:
        if prefix is None:
            raise
        raise EvomergeError(f"{prefix}: {exc}") from None

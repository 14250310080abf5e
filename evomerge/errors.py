"""The one exception type that reaches users as a message instead of a traceback."""


class EvomergeError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` and exits non-zero; the message names the file,
    key or tensor at fault so the user can act on it without a traceback.
    """

"""The one exception type that reaches users as a one-line message (exit code 2)."""


class SlmError(Exception):
    """A problem with the user's input or files: printed on one line, never as a traceback."""

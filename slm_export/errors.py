"""The one exception type that reaches users as a one-line message (exit code 2)."""


class SlmError(Exception):
    """A problem with the user's input or files: printed on one line, never as a traceback."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]

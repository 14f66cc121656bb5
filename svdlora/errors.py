"""The one error type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class SvdloraError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can be pages long)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

"""The one error type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class SvdloraError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can be pages long)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class BudgetError(SvdloraError):
    """A budget this model cannot be compressed at (too small for the targeted matrices, or leaving healing
    nothing to train), where another budget can: a sweep skips it and goes on; any other SvdloraError
    (bad calibration data, a refused setting) fails at every budget alike and stops the sweep."""

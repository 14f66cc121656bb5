"""The one error type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class SvdloraError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""

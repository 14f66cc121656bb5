"""The one error type for user mistakes: the CLI prints it as a single line and exits non-zero."""

from __future__ import annotations

import functools


class SvdloraError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


def require_bool(name: str, value) -> None:
    """Refuse a flag that is not a bool: ``merge="no"`` is truthy, and merged."""
    if not isinstance(value, bool):
        raise SvdloraError(f"{name} must be True or False, got {value!r}")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can be pages long)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


BUDGET_FLAG = "--budget"  # compress's option for the budget, which a BudgetError's fix names


class BudgetError(SvdloraError):
    """A budget this model cannot be compressed at (too small for the targeted matrices, or leaving healing
    nothing to train), where another budget can: a sweep skips it and goes on; any other SvdloraError
    (bad calibration data, a refused setting) fails at every budget alike and stops the sweep.

    ``template`` names the budget's option as ``{flag}``: compress's ``BUDGET_FLAG``, or the sweep's
    --budgets (``for_flag``)."""

    def __init__(self, template: str, flag: str = BUDGET_FLAG) -> None:
        self.template, self.flag = template, flag
        super().__init__(template.replace("{flag}", flag))  # not format: the values' own braces stay text

    def for_flag(self, flag: str) -> BudgetError:
        """The same error, the budget's option named ``flag``."""
        return BudgetError(self.template, flag)

    def __reduce__(self):  # pickled whole (a broadcast between ranks), not as its message alone
        return BudgetError, (self.template, self.flag)


# How a streamed refusal points to compressing in memory, for a run streamed by --stream; a launched run
# streams without the flag, and compresses in memory as one process started without the launcher
IN_MEMORY = "drop --stream"
IN_MEMORY_LAUNCHED = "run one process, without torchrun"
IN_MEMORY_FORCED = "pass --no-stream to load it in memory, which may not fit"  # streamed for memory, no flag given
IN_MEMORY_PLAIN = "compress in memory"  # a run without --stream that chose memory, where it cannot stream


class StreamingRefusal(SvdloraError):
    """What a streamed run cannot do and an in-memory one can. ``template`` says it, with ``{in_memory}``
    where the way to memory goes and ``{name}`` fields filled from ``values`` (a value's own braces stay
    text); the CLI words the way for how its run streams (``reworded``)."""

    def __init__(self, template: str, in_memory: str = IN_MEMORY, **values) -> None:
        if "{in_memory}" not in template:  # the way to memory is what this error is for
            raise ValueError(f"a StreamingRefusal's template names no {{in_memory}}: {template!r}")
        self.template, self.in_memory, self.values = template, in_memory, values
        super().__init__(template.format(in_memory=in_memory, **values))

    def reworded(self, in_memory: str) -> StreamingRefusal:
        """The same refusal, its way to memory worded ``in_memory``."""
        return StreamingRefusal(self.template, in_memory, **self.values)

    def __reduce__(self):  # pickled whole (a broadcast between ranks), not as its message alone
        return functools.partial(StreamingRefusal, self.template, self.in_memory, **self.values), ()

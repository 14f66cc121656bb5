"""Progress bars of the libraries svdlora drives, which its own ``progress=False`` does not reach otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_bars(shown: bool, datasets: bool = False) -> Iterator[None]:
    """Unless ``shown``, no bar of transformers ("Loading weights", save_pretrained's shards; its switch also
    turns huggingface_hub's download bars off) inside the block, nor, with ``datasets`` (the data readers), of
    datasets ("Generating train split"): both only have a global switch, turned off here and set back as it was
    after, an error too (a Python caller's other loads keep their bars; one that had them off keeps them off).
    datasets is imported only where asked: its import takes ~0.6 s, which a compress without data need not pay."""
    if shown:
        yield
        return
    from transformers.utils import logging as hf_logging  # here: a shown run does not import them

    libraries = [hf_logging]
    if datasets:
        from datasets.utils import logging as ds_logging

        libraries.append(ds_logging)
    from huggingface_hub import utils as hub_utils

    switches = [
        (logging.is_progress_bar_enabled, logging.disable_progress_bar, logging.enable_progress_bar)
        for logging in libraries
    ]
    # last: transformers' switch turns the hub's on and off with its own, so the hub's is set back after it
    switches.append(
        (
            lambda: not hub_utils.are_progress_bars_disabled(),
            hub_utils.disable_progress_bars,
            hub_utils.enable_progress_bars,
        )
    )
    were_shown = [is_shown() for is_shown, _, _ in switches]
    try:  # the switches turned off inside: one that fails leaves none of them off
        for _, disable, _ in switches:
            disable()
        yield
    finally:
        for (_, disable, enable), was_shown in zip(switches, were_shown, strict=True):
            (enable if was_shown else disable)()

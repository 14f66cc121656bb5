"""Whether a launcher (torchrun, accelerate launch) runs this process among others, read from the environment
it sets: without torch, so the CLI asks it before anything imports torch (``distributed`` joins the group)."""

from __future__ import annotations

import os


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process: RANK set and WORLD_SIZE a count
    above 1 (one that is no count is no launcher's)."""
    size = os.environ.get("WORLD_SIZE", "")
    return "RANK" in os.environ and size.isdecimal() and int(size) > 1

"""bars.quiet_bars: the libraries' global bar switches off inside the block, each set back as it was after."""

from __future__ import annotations

import pytest
from huggingface_hub import utils as hub_utils
from transformers.utils import logging as hf_logging

from svdlora.bars import quiet_bars


def test_a_caller_who_turned_off_only_the_hub_s_bars_keeps_them_off():
    """transformers' switch turns huggingface_hub's on with its own: setting transformers' back after the block
    turned on the hub bars a caller had turned off (found by the session's review)."""
    hf_logging.enable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        with pytest.raises(RuntimeError), quiet_bars(False):  # an error inside the block sets them back too
            assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
            raise RuntimeError
        assert hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()  # both on again, as the other tests expect

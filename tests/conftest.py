"""Tiny models built from configs, saved to tmp folders so CLI tests get real local paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when that data is not on this machine."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
    )


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=96,
            num_labels=3,
            max_position_embeddings=64,
        )
    )


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=4,
        )
    )


def tiny_marian():
    from transformers import MarianConfig, MarianMTModel

    return MarianMTModel(
        MarianConfig(
            vocab_size=96,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=95,
            eos_token_id=0,
            decoder_start_token_id=95,
        )
    )


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=96,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 40)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


TINY_MODELS = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "bert": tiny_bert,
    "vit": tiny_vit,
    "marian": tiny_marian,
    "t5": tiny_t5,
}


def example_inputs(kind: str, generator_seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(generator_seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(1, 90, (2, 12), generator=g)
    if kind in ("marian", "t5"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


def output_of(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**example_inputs(kind)).logits


@pytest.fixture(autouse=True)
def _library_bars_on():
    """Each test starts with transformers' (and so huggingface_hub's) bars on, as a fresh process does: the
    benchmarks' helpers turn them off for good (benchmarks/speed.py), and since the commands set the switches
    back as they found them (bars.quiet_bars) a test's captured output otherwise depended on the tests before it."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    yield


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):  # noqa: D103
    torch.manual_seed(0)
    return request.param, TINY_MODELS[request.param]().eval()


@pytest.fixture
def gpt2_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "gpt2-base"
    tiny_gpt2().save_pretrained(path)
    return path


@pytest.fixture
def group_readable_umask():
    """umask 022 for the test (new files then read 0644), whatever the caller's was."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def file_modes(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` by name, with its permission bits ('0o644')."""
    return {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}

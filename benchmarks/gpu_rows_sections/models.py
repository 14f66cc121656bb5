"""The benchmark models: random weights from Llama configs (SmolLM2-135M's, a 1B and a 7B shape), saved in bf16."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.gpu_rows_sections.state import RESULTS, log

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), inline so that the script needs no hub access
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 49152,
}


def configs(args) -> dict:
    base = {**SMOLLM2_135M, "dtype": "bfloat16"}
    big = {
        **base,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    }
    llama7b = {  # Llama-2-7B's shape: large enough matrices that batch-1 decode reads weights, not launches
        **base,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }
    if args.small:  # dry run: same architecture, tiny sizes
        base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=512)  # fmt: skip
        big.update(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, vocab_size=640)  # fmt: skip
        llama7b.update(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=32, vocab_size=640)  # fmt: skip
    return {"135m": base, "1b": big, "7b": llama7b}


def build(name, cfg, work: Path, dev) -> Path:
    import transformers

    folder = work / f"{name}-dense"
    if folder.exists():
        return folder
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    log(f"built {name}: {n / 1e6:.1f} M parameters -> {folder}")
    RESULTS.setdefault("models", {})[name] = {"parameters": n, "config": cfg, "bytes_on_disk": sum(
        f.stat().st_size for f in folder.glob("*.safetensors"))}  # fmt: skip
    return folder

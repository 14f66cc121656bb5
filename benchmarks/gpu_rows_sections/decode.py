# ruff: noqa: E501  (the log lines kept as they ran on the GPU)
"""decode135 (and the 1b section's decode): batch-1 greedy generate() and prefill, dense vs factorized / merged / auto."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.decoding import sync
from benchmarks.gpu_rows_sections.state import log


def section_decode(args, dense, compressed: dict, dtypes, repeats, new_tokens, prefill_tokens):
    import transformers

    from svdlora import load_compressed
    from svdlora.layers import LowRankLinear

    dev = args.device
    res = {}
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 89]], device=dev) % 500
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        dense_model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, device_map=dev).eval()
        vocab = dense_model.config.vocab_size
        long_prompt = torch.randint(1, vocab, (1, prefill_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
        for budget, folder in compressed.items():
            models = {
                "dense": dense_model,
                "factorized": load_compressed(folder, device=dev, dtype=dtype, runtime="factorized"),
                "merged": load_compressed(folder, device=dev, dtype=dtype, runtime="merged"),
                "auto": load_compressed(folder, device=dev, dtype=dtype, runtime="auto"),
            }
            kept = sum(isinstance(m, LowRankLinear) for m in models["auto"].modules())
            total = sum(isinstance(m, LowRankLinear) for m in models["factorized"].modules())
            rates = {k: [] for k in models}
            prefill = {k: [] for k in models}
            with torch.no_grad():
                for model in models.values():  # warm-up: kernels, cuBLAS handles, caches
                    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
                    model(long_prompt)
                for _ in range(repeats):
                    for name, model in models.items():
                        sync(dev)
                        start = time.perf_counter()
                        for _ in range(args.prefill_inner):
                            model(long_prompt)
                        sync(dev)
                        prefill[name].append(prefill_tokens * args.prefill_inner / (time.perf_counter() - start))
                        start = time.perf_counter()
                        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0)  # fmt: skip
                        sync(dev)
                        rates[name].append(new_tokens / (time.perf_counter() - start))
            d, dp = statistics.median(rates["dense"]), statistics.median(prefill["dense"])
            rows = {
                k: {
                    "decode_tok_s": statistics.median(v),
                    "decode_ratio_to_dense": statistics.median(v) / d,
                    "prefill_tok_s": statistics.median(prefill[k]),
                    "prefill_ratio_to_dense": statistics.median(prefill[k]) / dp,
                    "decode_all": v,
                    "prefill_all": prefill[k],
                }
                for k, v in rates.items()
            }
            rows["auto"]["layers_kept_factorized"] = f"{kept}/{total}"
            res[f"{dtype_name} budget {budget}"] = rows
            log(f"decode {dtype_name} {budget}: " + ", ".join(
                f"{k} {r['decode_tok_s']:.0f} tok/s x{r['decode_ratio_to_dense']:.2f} prefill x{r['prefill_ratio_to_dense']:.2f}"
                for k, r in rows.items()) + f"; auto kept {kept}/{total}")  # fmt: skip
            for k in ("factorized", "merged", "auto"):
                del models[k]
            del models
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        del dense_model
    res["settings"] = {"new_tokens": new_tokens, "prefill_tokens": prefill_tokens, "prefill_inner": args.prefill_inner,
                       "repeats": repeats, "prompt_tokens": prompt.shape[1]}  # fmt: skip
    return res

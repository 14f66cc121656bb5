"""Batch-1 greedy decoding with the step compiled (or not), shared by the speed benchmarks
(speed.py --parts compiled, gpu_rows.py, gpu_align.py)."""

from __future__ import annotations

import time

import torch


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


class CompiledDecoder:
    """Greedy batch-1 decode through a StaticCache, the decode step (forward + argmax) under torch.compile.

    The prompt is prefilled eagerly into the static cache (as `generate` does), then each new token is one
    call of the compiled step; with mode="reduce-overhead" on CUDA that call replays a CUDA graph, so per
    token the launch overhead is gone and the time is that of the kernels (bytes read for batch 1).
    Positions come from the cache's own length tensor, so every step has the same shapes: one compile.
    """

    def __init__(self, model, max_len, mode, backend):
        import inspect

        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        params = inspect.signature(model.forward).parameters  # transformers >= 5.2x renames past_key_values
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        model_, cache, kw = model, self.cache, self.cache_kw

        def step(ids):
            out = model_(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            return out.logits[:, -1].argmax(-1, keepdim=True)

        options = {"backend": backend}
        if backend == "inductor" and mode:
            options["mode"] = mode
        self.step = step if backend is None else torch.compile(step, **options)  # None: eager, uncompiled
        self.mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def prefill(self, prompt):
        self.cache.reset()
        out = self.model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, prompt, n, dev, keep=False):
        """(seconds for the n decode steps, prefill excluded; the tokens if keep)."""
        with torch.no_grad():
            ids = self.prefill(prompt)
            tokens = [ids.clone()] if keep else None
            sync(dev)
            start = time.perf_counter()
            for _ in range(n):
                self.mark()
                ids = self.step(ids).clone()  # out of the CUDA graph pool before the next replay
                if keep:
                    tokens.append(ids)
            sync(dev)
            seconds = time.perf_counter() - start
        return seconds, (torch.cat(tokens, 1)[0].tolist() if keep else None)

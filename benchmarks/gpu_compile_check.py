"""Does generate() compile a plain-from_pretrained svdlora model's decode on a GPU, as it does a dense one?

transformers compiles the forward for a static cache unless the quantizer says the model cannot be
compiled. A tiny pivoted Llama, compressed, saved, loaded with ``from_pretrained(device_map="cuda")``:
eager greedy tokens against ``cache_implementation="static"`` (auto-compiled), and dynamo's graph count.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python3 benchmarks/gpu_compile_check.py
"""

import tempfile
import time

import torch
import transformers

import svdlora
from tests.conftest import TINY_MODELS


def main() -> None:
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5, submatrices=2, pivot=True)
    folder = svdlora.save_compressed(model, tempfile.mkdtemp() + "/tinyllama-svd")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda").eval()
    ids = torch.tensor([[1, 5, 7, 9]], device="cuda")
    eager = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    start = time.time()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    print("hf_quantizer.is_compileable", model.hf_quantizer.is_compileable)
    print("static-cache generate s", round(time.time() - start, 1), "same tokens", out.tolist() == eager.tolist())
    print("dynamo counters", dict(torch._dynamo.utils.counters["stats"]))


if __name__ == "__main__":
    main()

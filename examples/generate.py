"""Load a compressed causal LM on the best device and generate text.

    python examples/generate.py out/smollm2-svd --baseline ~/.cache/svdlora/SmolLM2-135M \\
        --prompt "What is the capital of France?"
"""

import argparse
import time

import torch
from transformers import AutoTokenizer

from svdlora import load_compressed
from svdlora.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--baseline", default=None, help="the original model folder: answer with it too")
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_compressed(args.folder, device=args.device)
    print(f"loaded {args.folder} on {model.device} in {time.perf_counter() - start:.2f} s")
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    print(f"prompt: {args.prompt}")
    print("compressed:", answer(model, tokenizer, args.prompt, args.max_new_tokens))
    if args.baseline:
        dense = load_model(args.baseline, device=model.device)
        print("original:  ", answer(dense, tokenizer, args.prompt, args.max_new_tokens))


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer, through the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


if __name__ == "__main__":
    main()

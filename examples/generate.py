"""Load a compressed causal LM on the best device and generate text.

    python examples/generate.py out/smollm2-svd --prompt "What is the capital of France?"
"""

import argparse
import time

import torch
from transformers import AutoTokenizer

from svdlora import load_compressed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_compressed(args.folder, device=args.device)
    print(f"loaded {args.folder} on {model.device} in {time.perf_counter() - start:.2f} s")
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"prompt: {args.prompt}")
    print("output:", tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()

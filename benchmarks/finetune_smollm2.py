"""Fine-tune SmolLM2-135M on Tiny Shakespeare (CPU, minutes): the "tuned" model of the extraction benchmark.

Training text: the first 90% of Tiny Shakespeare (cut at a line break); the last 10% is held out
for evaluation and written next to the model as ``heldout.txt``. Every Linear layer of the blocks
and every RMSNorm is trained; the tied embedding / LM head stays frozen (its 28M parameters would
dominate the optimizer and a fine-tune on 0.3M tokens has no reason to move them), so the delta
has low-rank candidates (the Linear layers) and changed non-matrix tensors (the norms), which the
adapter must carry as ``modules_to_save``.

Settings: AdamW lr 2e-4 (constant after 20 warm-up steps), batches of 4 x 128 tokens drawn at
random offsets with a fixed seed, float32, OMP_NUM_THREADS=1.

Example:
    OMP_NUM_THREADS=1 python -m benchmarks.finetune_smollm2 --base /root/.cache/svdlora/SmolLM2-135M \
        --data /work/shared/data/text/tinyshakespeare.txt --output .cache/smollm2-shakespeare --steps 150
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def split_heldout(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """(first part, last ``fraction``), cut at the line break nearest the split point."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction))) + 1
    return text[:cut], text[cut:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(args.output)
    if (output / "model.safetensors").is_file():
        print(f"{output} exists: keeping the cached fine-tune")
        return
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    train_text, heldout = split_heldout(Path(args.data).read_text())
    ids = torch.tensor(tok(train_text)["input_ids"])
    for name, param in model.named_parameters():
        param.requires_grad = "embed_tokens" not in name and "lm_head" not in name
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        offsets = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=g)
        batch = torch.stack([ids[o : o + args.seq] for o in offsets.tolist()])
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tok.save_pretrained(output)
    (output / "heldout.txt").write_text(heldout)
    log = {**vars(args), "train_tokens": len(ids), "seconds": time.perf_counter() - start, "losses": losses}
    (output / "finetune_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {output} in {log['seconds']:.0f} s")


if __name__ == "__main__":
    main()

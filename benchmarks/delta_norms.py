"""How large is a fine-tune's delta beside the weights? ‖W_tuned − W_base‖_F / ‖W_base‖_F per matrix.

python -m benchmarks.delta_norms --base /root/.cache/svdlora/SmolLM2-135M --tuned .cache/smollm2-shakespeare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from .common import write_results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    args = p.parse_args(argv)
    base = load_file(str(Path(args.base) / "model.safetensors"))
    tuned = load_file(str(Path(args.tuned) / "model.safetensors"))
    ratios = {
        k: ((tuned[k] - base[k]).norm() / base[k].norm()).item() for k in base if base[k].ndim == 2 and k in tuned
    }
    changed = {k: v for k, v in ratios.items() if v > 0}
    summary = {
        "matrices_changed": len(changed),
        "mean": sum(changed.values()) / len(changed),
        "min": min(changed.values()),
        "max": max(changed.values()),
    }
    command = "python -m benchmarks.delta_norms " + " ".join(argv or sys.argv[1:])
    print(summary)
    write_results("delta_norms", {"command": command, "summary": summary, "per_matrix": changed})
    return summary


if __name__ == "__main__":
    main()

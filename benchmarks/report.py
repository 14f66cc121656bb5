"""Assemble BENCHMARKS.md from the Markdown fragments the benchmark scripts write.

Usage:
    python -m benchmarks report              # benchmarks/results/<name>.md -> BENCHMARKS.md
    python -m benchmarks report --quick      # the *_quick fragments -> benchmarks/results/BENCHMARKS_quick.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import DEFAULT_RESULTS

# Section order of the issue: 1 MNIST blog, 2 NN-SVD, 3 ViT, 4 translation, 5 language models.
SECTIONS = ("mnist_blog", "nnsvd", "vit_cifar", "translation", "language_models")
# Sections whose script `benchmarks all` does not run (slow, or run by hand part by part): their
# fragment is appended when it exists. ecosystem (issue 11) and speed (issue 10) were written by
# hand from their scripts' outputs; precision (issue 9) by `benchmarks.precision --report`; quality
# (issue 8) by `benchmarks.quality_report` from the results of benchmarks.quality / quality_models.
EXTRA_SECTIONS = ("ecosystem", "speed", "precision", "quality")
TITLES = {
    "mnist_blog": 'MNIST: "Compress a Neural Network with the SVD" (blog post)',
    "nnsvd": 'MNIST: "Neural Network Compression via Low-Rank Factorization" (NN-SVD)',
    "vit_cifar": 'ViT / CIFAR-10: the poster "SVD-LoRA" Tables 1 and 2',
    "translation": "Translation: the poster's NMT tables on Multi30k German→English",
    "language_models": "Language models: SmolLM2-135M and a GPT-2 trained here",
}

HEADER = """# Benchmarks

Every table below was measured by the benchmark code in `benchmarks/`, on the machine named in
its section, and sits beside the figure of its source where the source gives one. Where a source
figure is missing we say so instead of guessing it.

## How to reproduce

```
python -m benchmarks all            # every section, then this file (trains what is not cached)
python -m benchmarks all --quick    # smoke run: tiny models and slices, a few minutes
python -m benchmarks all --data DIR # data folder laid out as ../shared/data (mnist/, text/, ...)
python -m benchmarks <name> [...]   # one of: {names}
python -m benchmarks report         # reassemble this file from benchmarks/results/*.md
```

Data paths are arguments (defaults: `../shared/data`); trained models and per-setting sweep
caches go to `.cache/benchmarks` (`--cache-dir`), so a rerun only measures what is missing
(`--force` measures again). Results: `benchmarks/results/<name>.json` (every figure, with the
machine) and `<name>.png`. The sweeps of sections 3–5 evaluate a slice of each test set
(`--limit`, stated in each table) so that each finishes in minutes on a 2-core CPU; drop `--limit`
for full test-set numbers.

Machine: {machine}.

## What the method predicts, and what budget means

- **Submatrices.** svdlora's n residual stages each take the truncated SVD of what the previous
  stages left. With exact SVD, n stages of rank r are identical to one truncated SVD of rank n·r
  (Eckart–Young: the residual after the top singular triplets has the remaining triplets as its
  SVD). So at a fixed budget the number of submatrices changes nothing except how the total
  rank, floor(b·mn/(m+n)), is split over the stages; rows that differ only in n must agree up to
  float round-off. They can differ only with `svd_method="randomized"`, where each stage is a
  fresh randomized sketch of the residual. Inference cost does not depend on n either: the
  stages are concatenated into two factors.
- **Budget.** Budget b lets the factors of an m×n matrix hold b·mn values, i.e. total rank
  b·mn/(m+n): for a square matrix only b/2 of its spectrum. **Budget 1.0 is not lossless**:
  square matrices (and others whose factors would be no smaller) stay dense there, the others
  lose part of their spectrum.
- **A real LLM does not survive plain truncation.** SmolLM2-135M-Instruct, compressed at budget
  0.95 and at 0.5 (3 submatrices), answers a question with gibberish where the dense model
  answers "The capital of France is Paris." (greedy decoding; section 5 has the measured
  perplexities and the generated text). Calibration-aware compression, svdlora's default since
  issue 8, is what makes it work: section 9 has every method side by side.
"""


def machine_summary(results_dir: Path, names: list[str]) -> str:
    for name in names:
        path = results_dir / f"{name}.json"
        if path.is_file():
            m = json.loads(path.read_text()).get("machine")
            if m:
                return (
                    f"{m['platform']}, {m['cpu_count']} CPUs, shared with other jobs (each section says how noisy "
                    f"its timings were), torch {m['torch']}, {m['device']}; dates per section"
                )
    return "see each section"


def assemble(results_dir: Path = DEFAULT_RESULTS, output: Path = Path("BENCHMARKS.md"), quick: bool = False) -> Path:
    """Write ``output`` from ``results_dir/<name>[_quick].md``, numbering the sections 1–5."""
    names = [f"{n}_quick" if quick else n for n in SECTIONS]
    rel = _relative(results_dir, output.parent)
    parts = [HEADER.format(names=", ".join(SECTIONS), machine=machine_summary(results_dir, names)).strip()]
    for i, (section, name) in enumerate(zip(SECTIONS, names, strict=True), 1):
        fragment = results_dir / f"{name}.md"
        if fragment.is_file():
            text = fragment.read_text().strip()
            # Number the fragment's own title; figures are linked relative to the results folder.
            text = re.sub(r"^## ", f"## {i}. ", text, count=1)
            text = re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", lambda mt: f"]({rel}/{mt.group(1)})", text)
        else:
            text = (f"## {i}. {TITLES[section]}\n\nNot run yet: `python -m benchmarks {section}"
                    f"{' --quick' if quick else ''}` writes this section.")  # fmt: skip
        parts.append(text)
    for i, name in enumerate(EXTRA_SECTIONS, len(SECTIONS) + 1):
        fragment = results_dir / f"{name}{'_quick' if quick else ''}.md"
        if fragment.is_file():
            parts.append(re.sub(r"^## ", f"## {i}. ", fragment.read_text().strip(), count=1))
    output.write_text("\n\n".join(parts) + "\n")
    return output


def _relative(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="default: %(default)s")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: BENCHMARKS.md, or <results-dir>/BENCHMARKS_quick.md with --quick")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="assemble the *_quick fragments")
    args = parser.parse_args(argv)
    output = args.output or (args.results_dir / "BENCHMARKS_quick.md" if args.quick else Path("BENCHMARKS.md"))
    path = assemble(args.results_dir, output, args.quick)
    print(path)
    return path


if __name__ == "__main__":
    main()

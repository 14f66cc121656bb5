"""The sections of benchmarks/gpu_rows.py (the script: its docstring says what each measures), by group:
state (clock, results, log), models (configs, building), compressing (+ compress135), load, decode, svd,
llama1b, decode_variants (decode1b / decode135v / decode7b) with dynamo_watch."""

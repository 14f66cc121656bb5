"""The values flags and API options accept, defined once in a module that imports nothing heavy,
so the command line builds its parser (``--help``, flag errors) without importing torch."""

TEXT, IMAGES, TRANSLATION = "text-generation", "image-classification", "translation"
TASKS = (TEXT, IMAGES, TRANSLATION)  # what `svdlora eval` measures

RUNTIMES = ("factorized", "pairs", "merged", "auto", "auto-graphs")  # how a loaded folder computes (svdlora.runtime)
AUTO_RUNTIMES = ("auto", "auto-graphs")  # measured per layer

DTYPES = ("float32", "float16", "bfloat16", "float64")  # the model dtypes --dtype (dtype=) loads in
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                 "fp64": "float64", "double": "float64"}  # fmt: skip
DTYPE_ERROR = f"dtype must be one of {', '.join(DTYPES)}; got {{!r}}"

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
DEFAULT_TEXT_COLUMN = "text"  # the text-generation dataset column --text-column (text_column=) reads by default

"""The values flags and API options accept, defined once in a module that imports nothing heavy,
so the command line builds its parser (``--help``, flag errors) without importing torch."""

TEXT, IMAGES, TRANSLATION = "text-generation", "image-classification", "translation"
TASKS = (TEXT, IMAGES, TRANSLATION)  # what `svdlora eval` measures

RUNTIMES = ("factorized", "pairs", "merged", "auto", "auto-graphs")  # how a loaded folder computes (svdlora.runtime)
AUTO_RUNTIMES = ("auto", "auto-graphs")  # measured per layer

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
DEFAULT_TEXT_COLUMN = "text"  # the text-generation dataset column --text-column (text_column=) reads by default

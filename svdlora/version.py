__version__ = "0.1.0"

# Bumped whenever the on-disk layout changes in a way older readers cannot load.
FORMAT_VERSION = 2  # 2: stage dtypes (quantized stages); plain folders are still written as 1

__version__ = "0.1.0"

# Bumped whenever the on-disk layout changes in a way older readers cannot load.
# 2: stage dtypes (quantized stages); 3: pivoted factors; plain folders are still written as 1
FORMAT_VERSION = 3

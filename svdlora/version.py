__version__ = "0.1.0"

# Bumped whenever the on-disk layout changes in a way older readers cannot load.
# 2: stage dtypes (quantized stages); 3: pivoted factors; 4: relative errors may be null (not measured);
# each folder is written in the lowest format its contents need (plain folders: 1)
FORMAT_VERSION = 4

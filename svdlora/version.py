__version__ = "0.1.0"

# Bumped whenever the on-disk layout changes in a way older readers cannot load.
# 2: stage dtypes (quantized stages); 3: pivoted factors; 4: relative errors may be null (not measured);
# each folder is written in the lowest format its contents need (plain folders: 1)
FORMAT_VERSION = 4
READABLE_FORMATS = tuple(range(1, FORMAT_VERSION + 1))


def format_refusal(found) -> str:
    """What to do with a folder in format ``found``, one this svdlora does not read (the end of the
    message each loader gives): a higher format was written by a newer svdlora, so upgrading reads it."""
    newer = str(found).isdigit() and int(found) > FORMAT_VERSION  # the header holds it as a string
    fix = (
        "upgrade svdlora to load it (a newer svdlora wrote it)"
        if newer
        else "install the matching svdlora version or re-run `svdlora compress`"
    )
    return f"this is svdlora {__version__} reading formats {', '.join(map(str, READABLE_FORMATS))}: {fix}"

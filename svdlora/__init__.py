"""svdlora: residual-SVD compression of Hugging Face and PyTorch models under a parameter budget."""

from .compress import compress
from .config import CompressionConfig
from .errors import SvdloraError
from .evaluation import evaluate
from .io import load_compressed, save_compressed
from .layers import LowRankLinear
from .version import __version__

__all__ = [
    "CompressionConfig",
    "LowRankLinear",
    "SvdloraError",
    "__version__",
    "compress",
    "evaluate",
    "load_compressed",
    "save_compressed",
]

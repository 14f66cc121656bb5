"""svdlora: residual-SVD compression of Hugging Face and PyTorch models under a parameter budget."""

from . import integrations
from .compress import compress
from .config import CompressionConfig
from .errors import SvdloraError
from .evaluation import evaluate
from .io import load_compressed
from .layers import LowRankLinear
from .saving import save_compressed
from .siblings import stack_siblings
from .version import __version__

integrations.register()  # AutoModel*.from_pretrained(svdlora folder) works after `import svdlora`

__all__ = [
    "CompressionConfig",
    "LowRankLinear",
    "SvdloraError",
    "__version__",
    "compress",
    "evaluate",
    "load_compressed",
    "save_compressed",
    "stack_siblings",
]

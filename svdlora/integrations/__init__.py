"""Bridges to the Hugging Face ecosystem: transformers' quantizer registry and peft adapters.

``import svdlora`` registers the quantizer (see ``hf_quantizer``), so an svdlora folder loads with
``AutoModelFor*.from_pretrained(folder)``. The peft writer is imported on use only (peft is heavy).
"""

from .hf_quantizer import register
from .quantization_config import QUANT_METHOD, SvdloraQuantizationConfig

__all__ = ["QUANT_METHOD", "SvdloraQuantizationConfig", "register"]

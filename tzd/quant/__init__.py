"""Weight-only quantization of a model's linear layers and stacked experts (int8, int4, fp8), applied while it
loads."""

from tzd.quant.apply import Quantizer, count_weights, quantize_model, weight_bytes
from tzd.quant.config import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    QUANTIZATIONS,
    QuantConfig,
    QuantizationError,
    as_quant_config,
    check_device,
)

__all__ = ["DEFAULT_GROUP_SIZE", "GROUP_SIZES", "QUANTIZATIONS", "QuantConfig", "QuantizationError", "Quantizer",
           "as_quant_config", "check_device", "count_weights", "quantize_model", "weight_bytes"]

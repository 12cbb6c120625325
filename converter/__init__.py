"""convert-fp8: stream a BF16 Hugging Face checkpoint into a block-quantized FP8 checkpoint."""

__version__ = "0.1.0"

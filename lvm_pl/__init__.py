"""lvm-pl: Large Vision Models (VQGAN tokenizer + LLaMA over visual sentences) in PyTorch Lightning."""

__version__ = "0.1.0"

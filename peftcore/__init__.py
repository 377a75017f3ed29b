"""peftcore: parameter-efficient fine-tuning from scratch in plain PyTorch."""
__version__ = "0.1.0"

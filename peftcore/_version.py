"""The package version, in a module of its own: the package's face re-exports it, and adapter_io writes it
into model cards (nothing inside the package may import the face)."""
__version__ = "0.1.0"

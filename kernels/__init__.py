"""Triton kernels, each beside its pure-torch reference (the CPU path and the test oracle)."""

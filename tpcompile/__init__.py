"""tpcompile: an ahead-of-time tensor-parallel compiler for PyTorch programs."""

__version__ = "0.1.0"

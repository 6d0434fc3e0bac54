"""sparse_unsloth: SparseLoRA contextual sparsity for Unsloth / PEFT LoRA fine-tuning."""

from .config import ConfigError, SparseConfig, load_config, preset_names
from .estimator import EstimatorFactors, EstimatorFileError
from .flops import flop_fraction
from .patch import sparse_state, sparsify, unsparsify

__version__ = "0.1.0"
__all__ = ["ConfigError", "EstimatorFactors", "EstimatorFileError", "SparseConfig", "SparsityCallback",
           "calibrate", "flop_fraction", "load_config", "preset_names", "sparse_state", "sparsify",
           "unsparsify"]


def __getattr__(name: str):
    # The trainer callback needs transformers' Trainer (which imports peft); importing it lazily
    # lets `import sparse_unsloth` come before `import unsloth`, which must precede transformers.
    if name == "SparsityCallback":
        from .callbacks import SparsityCallback

        return SparsityCallback
    if name == "calibrate":  # tokenizes with transformers: lazy for the same reason
        from .calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'sparse_unsloth' has no attribute {name!r}")

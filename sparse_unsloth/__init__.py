"""sparse_unsloth: SparseLoRA contextual sparsity for Unsloth / PEFT LoRA fine-tuning."""

from .config import ConfigError, SparseConfig, load_config, preset_names

__version__ = "0.1.0"
__all__ = ["ConfigError", "EstimatorFactors", "EstimatorFileError", "SparseConfig", "SparsityCallback",
           "calibrate", "flop_fraction", "load_config", "preset_names", "sparse_state", "sparsify",
           "unsparsify"]

# Imported on first use: the estimator and the patch import torch (seconds), the callback imports
# transformers' Trainer (which imports peft). So `sparse-unsloth --help` stays instant, and
# `import sparse_unsloth` may come before `import unsloth`, which must precede transformers.
_LAZY = {"EstimatorFactors": ".estimator", "EstimatorFileError": ".estimator", "sparse_state": ".patch",
         "sparsify": ".patch", "unsparsify": ".patch", "SparsityCallback": ".callbacks",
         "calibrate": ".calibration", "flop_fraction": ".flops"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sparse_unsloth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""sparse_unsloth: SparseLoRA contextual sparsity for Unsloth / PEFT LoRA fine-tuning."""

from .callbacks import SparsityCallback
from .config import ConfigError, SparseConfig, load_config, preset_names
from .estimator import EstimatorFactors, EstimatorFileError
from .patch import sparse_state, sparsify, unsparsify

__version__ = "0.1.0"
__all__ = ["ConfigError", "EstimatorFactors", "EstimatorFileError", "SparseConfig", "SparsityCallback",
           "load_config", "preset_names", "sparse_state", "sparsify", "unsparsify"]

"""The training-free channel estimator: SVD factors, their file format, channel selection."""

from .factors import EstimatorFactors, build_factors, svd_factors
from .store import EstimatorFileError, fingerprint, load_factors, save_factors

__all__ = ["EstimatorFactors", "EstimatorFileError", "build_factors", "fingerprint", "load_factors",
           "save_factors", "svd_factors"]

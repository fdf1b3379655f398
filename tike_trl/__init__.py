"""tike-trl: the TIKE KL estimator (and k1/k2/k3/rb) for Hugging Face TRL's GRPO trainer."""

from .estimators import ESTIMATORS, TAILS, kl_estimate

__all__ = ["ESTIMATORS", "TAILS", "kl_estimate"]
__version__ = "0.1.0"

"""tike-trl: the TIKE KL estimator (and k1/k2/k3/rb) for Hugging Face TRL's GRPO trainer.

Swap one import in a TRL GRPO script::

    from tike_trl import TIKEConfig, TIKEGRPOTrainer   # was: from trl import GRPOConfig, GRPOTrainer
"""

from .config import TIKEConfig
from .estimators import ESTIMATORS, TAILS, kl_estimate, sequence_kl_surrogate
from .trainer import TIKEGRPOTrainer

__all__ = ["ESTIMATORS", "TAILS", "TIKEConfig", "TIKEGRPOTrainer", "kl_estimate", "sequence_kl_surrogate"]
__version__ = "0.1.0"

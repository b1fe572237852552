"""The model selection layer: which models answer a query, how their answers combine."""

from .combine import OUTPUT_KINDS, combine, detect_kind
from .losses import LOSSES, make_loss
from .policies import MISSING, UCB1, Exp3, Exp4, SingleModel
from .policy import Option, Policy, get_policy_class, make_policy, policy_names, register_policy

__all__ = [
    "OUTPUT_KINDS", "combine", "detect_kind", "LOSSES", "make_loss", "MISSING", "SingleModel", "Exp3", "Exp4",
    "UCB1", "Option", "Policy", "get_policy_class", "make_policy", "policy_names", "register_policy",
]

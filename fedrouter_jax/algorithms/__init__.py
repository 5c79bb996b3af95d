"""Federated methods, all with the same shape (see base.py). Importing registers them."""
from fedrouter_jax.algorithms.base import Algorithm, Context, EvalPlan, RoundPlan, available, get_algorithm
from fedrouter_jax.algorithms import fedrouter  # noqa: F401

try:  # baselines (FedIT, Local, FedCluster, FedSA, FedDPA)
    from fedrouter_jax.algorithms import baselines  # noqa: F401
except ImportError as e:  # pragma: no cover - only while the module is absent
    if "baselines" not in str(e):
        raise

__all__ = ["Algorithm", "Context", "EvalPlan", "RoundPlan", "available", "get_algorithm"]

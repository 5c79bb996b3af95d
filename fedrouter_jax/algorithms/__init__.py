"""Federated methods as client / server functions (see base.py). Importing registers them."""
from fedrouter_jax.algorithms.base import (ClientInputs, Env, Method, Reply, RouteMessage, Routing, available,
                                           get_method)
from fedrouter_jax.algorithms import baselines, fedrouter  # noqa: F401

__all__ = ["ClientInputs", "Env", "Method", "Reply", "RouteMessage", "Routing", "available", "get_method"]

"""Clustering for FedRouter: jitted K-Means (batched over clients), Silhouette, choice of k,
clustering accuracy, nearest-centroid matching. Knows nothing of models or federation."""

from .kmeans import (
    BatchedKMeansResult,
    KMeansResult,
    batched_kmeans,
    kmeans,
    kmeans_plusplus,
    nearest_centroid,
    pairwise_sq_distances,
)
from .metrics import clustering_accuracy, contingency_matrix
from .select_k import choose_k, choose_k_batched
from .silhouette import batched_silhouette_score, silhouette_samples, silhouette_score

__all__ = [
    "BatchedKMeansResult",
    "KMeansResult",
    "batched_kmeans",
    "batched_silhouette_score",
    "choose_k",
    "choose_k_batched",
    "clustering_accuracy",
    "contingency_matrix",
    "kmeans",
    "kmeans_plusplus",
    "nearest_centroid",
    "pairwise_sq_distances",
    "silhouette_samples",
    "silhouette_score",
]

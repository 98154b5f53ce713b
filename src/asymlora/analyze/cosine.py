"""Cosine similarity between vectors given by their Gram matrix, as the analysis compares them (task
gradients, expert updates): zero vectors have no direction, so their cosines are NaN."""

from __future__ import annotations

import torch


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix ``G[t, u] = <g_t, g_u>``: ``G[t, u] / sqrt(G[t, t] G[u, u])``.

    Entries involving a zero vector are NaN; values are clamped to [-1, 1] (rounding).
    """
    gram = gram.double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    denominator = norms.unsqueeze(0) * norms.unsqueeze(1)
    cosine = torch.where(denominator > 0, gram / denominator.clamp(min=1e-300),
                         torch.full_like(gram, float("nan")))
    return cosine.clamp(-1.0, 1.0)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """T x T cosine similarities between the rows of ``vectors`` (T, P) (NaN for a zero row)."""
    flat = vectors.reshape(vectors.shape[0], -1).double()
    return cosine_from_gram(flat @ flat.T)


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the finite off-diagonal entries (NaN when there is none, e.g. a single task)."""
    size = matrix.shape[0]
    off = matrix[~torch.eye(size, dtype=torch.bool)]
    off = off[torch.isfinite(off)]
    return float(off.mean()) if off.numel() else float("nan")

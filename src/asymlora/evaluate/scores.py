"""A task result's headline score and the mean over tasks, as reports and paired comparisons compute them.

A task's result names its headline ``metric`` and whether higher is better (default: yes). In the mean over
tasks a lower-is-better metric (CER) enters as ``max(0, 1 - value)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

_Score = TypeVar("_Score", float, np.ndarray)


def headline(result: dict[str, Any]) -> tuple[str, float, bool]:
    """(metric name, value, higher_is_better) of one task's result."""
    name = result["metric"]
    return name, float(result[name]), bool(result.get("higher_is_better", True))


def oriented(value: _Score, higher: bool) -> _Score:
    """A task score as it enters the mean over tasks: unchanged if higher is better, else max(0, 1 - value).

    Works on a float and element-wise on a numpy array (the paired bootstrap's resampled scores).
    """
    if higher:
        return value
    if isinstance(value, np.ndarray):
        return np.maximum(0.0, 1.0 - value)
    return max(0.0, 1.0 - value)


def mean_score(task_results: dict[str, dict[str, Any]]) -> float:
    """Mean over tasks of the headline metric, with lower-is-better metrics (CER) turned into 1 - value."""
    values = []
    for result in task_results.values():
        _, value, higher = headline(result)
        values.append(oriented(value, higher))
    return sum(values) / len(values) if values else 0.0

"""Official benchmark metrics, one module per family, each reproducing a named official script.

================  ===========================================================================================
module            reproduces
================  ===========================================================================================
``vqa``           VQA soft accuracy + EvalAI answer normalisation (m4c_evaluator / VQA API): VQAv2, TextVQA,
                  VizWiz
``gqa``           GQA ``eval.py``: exact match (after LLaVA's conversion), binary/open, distribution
``scienceqa``     LLaVA ``eval_science_qa.py``: option-letter parsing and accuracy (IMG subset)
``mme``           MME ``eval_tool/calculation.py``: yes/no parsing, acc, acc+, perception/cognition totals
``pope``          POPE ``evaluate.py`` (LLaVA ``eval_pope.py``): yes/no parsing, accuracy, precision, recall,
                  F1, yes-ratio
``builtin``       the built-in tasks: exact match, first-word match, single-reference VQA match, CER, ROUGE-L;
                  the ``TASK_METRICS`` registry and ``score_task``
================  ===========================================================================================

All modules are pure Python (no model code, no third-party dependency). See ``docs/metrics.md``.
"""

from asymlora.evaluate.metrics import builtin, gqa, mme, pope, scienceqa, vqa
from asymlora.evaluate.metrics.builtin import TASK_METRICS, score_task
from asymlora.evaluate.metrics.vqa import normalize_answer, vqa_accuracy, vqa_accuracy_batch

__all__ = [
    "TASK_METRICS",
    "builtin",
    "gqa",
    "mme",
    "normalize_answer",
    "pope",
    "scienceqa",
    "score_task",
    "vqa",
    "vqa_accuracy",
    "vqa_accuracy_batch",
]

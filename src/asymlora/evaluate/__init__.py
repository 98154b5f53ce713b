"""Evaluation: official benchmark metrics and readers (and, later, generation and reports).

* :mod:`asymlora.evaluate.metrics` — one module per metric family (VQA accuracy, GQA, ScienceQA, MME, POPE,
  and the metrics of the built-in tasks), each reproducing a named official script.
* :mod:`asymlora.evaluate.benchmarks` — readers for the official local file layouts of TextVQA, GQA,
  VizWiz, ScienceQA, MME and POPE, their LLaVA-1.5 prompt suffixes and the metric that scores each.

See ``docs/metrics.md``.
"""

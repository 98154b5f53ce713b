"""Evaluation: generation, official metrics and benchmark readers, reports and paired comparisons.

* :mod:`asymlora.evaluate.metrics` — one module per metric family (VQA accuracy, GQA, ScienceQA, MME, POPE,
  and the metrics of the built-in tasks), each reproducing a named official script.
* :mod:`asymlora.evaluate.official` — readers for the official local file layouts of TextVQA, GQA,
  VizWiz, ScienceQA, MME and POPE, their LLaVA-1.5 prompt suffixes and the metric that scores each.
* :mod:`asymlora.evaluate.generate` — prompts, greedy answers and candidate ranking with a model.
* :mod:`asymlora.evaluate.scores` — a task result's headline metric and the mean score over tasks.
* :mod:`asymlora.evaluate.report` — ``results.json``, markdown tables and bar charts; runs side by side.
* :mod:`asymlora.evaluate.paired` — paired bootstrap differences between runs on the same test items.
* :mod:`asymlora.evaluate.run` — ``asymlora eval`` and ``asymlora compare``.

See ``docs/metrics.md``.
"""

"""The official VLM benchmarks (TextVQA, GQA, VizWiz, ScienceQA, MME, POPE) from their local files.

* :mod:`~asymlora.evaluate.official.items` — the :class:`EvalItem` record, :class:`MissingFileError` and the
  readers' shared input checks.
* :mod:`~asymlora.evaluate.official.readers` — one reader per benchmark's official file layout.
* :mod:`~asymlora.evaluate.official.registry` — each benchmark's reader, LLaVA-1.5 prompt suffix and metric;
  ``read_benchmark``, ``build_prompt``, ``score_benchmark``.

See ``docs/metrics.md``.
"""

"""Task-conflict analysis of an adapter (``asymlora analyze``; the method is in :mod:`asymlora.analyze.run`).

* :mod:`~asymlora.analyze.cosine` — cosine similarities from Gram matrices.
* :mod:`~asymlora.analyze.gradients` — each task's gradient on the A and B banks; cosines between tasks.
* :mod:`~asymlora.analyze.experts` — expert load, router entropy, task-expert information, expert similarity.
* :mod:`~asymlora.analyze.report` — ``analysis.json``, ``analysis.md`` and the plots.
* :mod:`~asymlora.analyze.run` — loading an adapter, choosing samples, the whole analysis and its command.
"""

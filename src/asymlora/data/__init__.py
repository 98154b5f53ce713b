"""Data: readers of user data (LLaVA JSON/JSONL, messages), mixtures with task names, the collator."""

from asymlora.data.mixture import Mixture, MixtureEntry, load_mixture
from asymlora.data.reader import ReadReport, Sample, read_samples, read_samples_with_report

__all__ = ["Mixture", "MixtureEntry", "ReadReport", "Sample", "load_mixture", "read_samples",
           "read_samples_with_report"]

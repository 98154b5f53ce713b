"""Data: readers of user data (LLaVA JSON/JSONL, messages, LLaMA-Factory registries), mixtures, the collator.

See docs/data-format.md for the accepted formats, the validation and the mixture YAML.
"""

from asymlora.data.mixture import Mixture, MixtureEntry, builtin_mixtures, load_mixture
from asymlora.data.reader import (
    FROM_RECORD,
    Problem,
    ReadReport,
    Sample,
    iter_records,
    read_samples,
    read_samples_with_report,
)
from asymlora.data.registry import RecordFormat

__all__ = [
    "Mixture",
    "MixtureEntry",
    "FROM_RECORD",
    "Problem",
    "RecordFormat",
    "ReadReport",
    "Sample",
    "builtin_mixtures",
    "iter_records",
    "load_mixture",
    "read_samples",
    "read_samples_with_report",
]

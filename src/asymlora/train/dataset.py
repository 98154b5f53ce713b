"""The training data: samples encoded on access, and the weighted multi-task sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from asymlora.data.collator import SampleEncoder, estimate_length
from asymlora.data.mixture import load_mixture
from asymlora.train.config import TrainConfig


class EncodedDataset(Dataset):
    """Samples encoded on access by a :class:`~asymlora.data.collator.SampleEncoder`."""

    def __init__(self, samples: Sequence[Any], encoder: Any) -> None:
        self.samples = list(samples)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.encoder(self.samples[index])


class MixtureSampler(Sampler[int]):
    """Weighted multi-task sampling (with replacement), optionally grouped by length.

    The order depends only on (seed, epoch), so a resumed run that skips the batches already seen gets
    exactly the samples the uninterrupted run would have.
    """

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int, lengths: Sequence[int] | None = None,
                 group_size: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.lengths = list(lengths) if lengths is not None else None
        self.group_size = group_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()
        if self.lengths is not None and self.group_size > 1:
            groups = [order[i:i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [i for g in groups for i in sorted(g, key=lambda j: -self.lengths[j])]
        return iter(order)


def build_datasets(config: TrainConfig, processor: Any, tasks: Sequence[str], seed: int) -> dict[str, Any]:
    mixture = load_mixture(config.data.mixture)
    train_samples = mixture.load(split="train", seed=seed, on_error=config.data.on_error)
    if config.data.max_train_samples:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(train_samples), generator=generator)[: config.data.max_train_samples]
        train_samples = [train_samples[i] for i in sorted(keep.tolist())]
    encoder = SampleEncoder(processor, tasks=tasks, max_length=config.data.max_length)
    result: dict[str, Any] = {
        "mixture": mixture,
        "encoder": encoder,
        "train": EncodedDataset(train_samples, encoder),
        "weights": mixture.sampling_weights(train_samples),
        "lengths": [estimate_length(s, 64) for s in train_samples],
        "eval": None,
    }
    if config.data.eval_split:
        eval_samples = mixture.load(split=config.data.eval_split, seed=seed, on_error=config.data.on_error)
        if config.data.max_eval_samples:
            eval_samples = eval_samples[: config.data.max_eval_samples]
        result["eval"] = EncodedDataset(eval_samples, encoder) if eval_samples else None
    return result

"""easy-VQA: "What color is the shape?" -> "blue", "What shape is present?" -> "circle", about one
coloured shape on a 64 px image.

Source: PyPI ``easy-vqa==1.0`` (MIT), ``easy_vqa/data/{train,test}/`` with ``images/<id>.png`` and
``questions.json`` = ``[[question, answer, image_id], ...]``. Only the package's open questions are
used, those answered with a colour or a shape (:data:`ANSWERS`: 8 colours, 3 shapes); its yes/no
questions are left out (the question alone predicts most of their answers, so they mostly measure the
answer prior, not the image). The package has train and test only, so validation images are carved out
of the train images (a fixed seeded choice of whole images: no image is in both train and val). Images
are copied byte for byte; the question gets a capital first letter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample

VAL_IMAGES = 500  # train images held out for validation
ANSWERS = frozenset({"red", "green", "blue", "yellow", "teal", "brown", "black", "gray",
                     "circle", "rectangle", "triangle"})  # the open questions' answers


def _load(data_dir: Path, part: str) -> list[tuple[str, str, int]]:
    rows = json.loads((data_dir / part / "questions.json").read_text(encoding="utf-8"))
    return [(str(q), str(a), int(i)) for q, a, i in rows if str(a) in ANSWERS]


def _sample(
    context: BuildContext,
    split: str,
    rows: list[tuple[str, str, int]],
    image_dir: Path,
    source: str,
) -> list[Sample]:
    order = context.rng("questions", split).permutation(len(rows))[: context.size(split, len(rows))]
    samples = []
    for index in order:
        question, answer, image_id = rows[index]
        image = context.copy_image(split, f"{source}-{image_id:04d}", image_dir / f"{image_id}.png")
        samples.append(Sample(image, question[:1].upper() + question[1:], answer))
    return samples


def make(context: BuildContext, assets: Mapping[str, Path]) -> dict[str, list[Sample]]:
    """Open train/val questions from the package's train images (split by image), test from its test images."""
    data_dir = assets["easyvqa"].parent.parent  # the member is easy_vqa/data/train/questions.json
    train_rows = _load(data_dir, "train")
    image_ids = sorted({i for _, _, i in train_rows})
    chosen = context.rng("val-images").permutation(len(image_ids))[:VAL_IMAGES]
    val_ids = {image_ids[k] for k in chosen}
    return {
        "train": _sample(
            context,
            "train",
            [r for r in train_rows if r[2] not in val_ids],
            data_dir / "train" / "images",
            "train",
        ),
        "val": _sample(
            context, "val", [r for r in train_rows if r[2] in val_ids], data_dir / "train" / "images", "train"
        ),
        "test": _sample(context, "test", _load(data_dir, "test"), data_dir / "test" / "images", "test"),
    }


BUILDER = DatasetBuilder(
    name="easyvqa",
    description="easy-VQA: the colour or the shape of a coloured shape (11 answers)",
    source="PyPI easy-vqa==1.0",
    licence="MIT",
    assets=("easyvqa",),
    default_sizes={"train": 4000, "val": 500, "test": 500},
    make=make,
)

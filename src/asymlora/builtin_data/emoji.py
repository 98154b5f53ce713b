"""Emoji: "Which category is this emoji from?" answered with the emoji's Unicode category name.

Source: npm ``emoji-datasource-twitter@16.0.0``: ``package/emoji.json`` (MIT; name, category,
subcategory, has_img_twitter, image) and ``package/img/twitter/64/*.png`` (Twemoji graphics,
CC-BY 4.0, Twitter Inc. and contributors). Only base emoji are used (the top-level entries; their skin
tone variations are not), only those with ``has_img_twitter`` and a PNG present, and not the five
skin-tone swatches of the "Component" category. Each emoji appears once, in one split (fixed seeded
assignment: :data:`EVAL_SIZE` for val and for test, the rest for train). Icons are composited onto
white and saved as 64 px RGB PNGs.

The answer is one of the nine category names ("Smileys & Emotion", "Flags", "Food & Drink", ...): every
test emoji is unseen in training, but its answer is not, so the task measures whether the model tells
the kind of picture from the image. (:func:`describe` gives the longer sentence with name and
subcategory, which names unseen emoji and is not learnable from the train split.)
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample
from asymlora.errors import DataError

QUESTION = "Which category is this emoji from?"
EVAL_SIZE = 300  # emoji in val and in test each
EXCLUDED_CATEGORIES = frozenset({"Component"})
_AN_EXCEPTIONS = ("uni", "use", "usu", "one", "eu", "ewe")  # vowel letters with a consonant sound
_A_EXCEPTIONS = ("hour", "honest", "honou")  # consonant letters with a vowel sound


def article(phrase: str) -> str:
    """ "a" or "an" for ``phrase`` (by its first letter, with the common English exceptions)."""
    first = unicodedata.normalize("NFD", phrase)[:1].lower()
    lowered = phrase.lower()
    if lowered.startswith(_A_EXCEPTIONS) or first.isdigit() and lowered.startswith(("8", "11", "18")):
        return "an"
    if first in "aeiou" and not lowered.startswith(_AN_EXCEPTIONS):
        return "an"
    return "a"


def display_name(name: str) -> str:
    """The emoji's name as running text: upper-case Unicode names in lower case, "X Flag" as "X flag"."""
    if name == name.upper():
        return name.lower()
    return name[: -len(" Flag")] + " flag" if name.endswith(" Flag") else name


def describe(entry: Mapping[str, Any]) -> str:
    """The reference sentence for one emoji.json entry."""
    name = display_name(str(entry["name"]))
    subcategory = str(entry["subcategory"])
    sentence = f"{article(name)} {name}, {article(subcategory)} {subcategory} emoji from the {entry['category']} category."
    return sentence[:1].upper() + sentence[1:]


def usable_entries(package_dir: Path) -> list[dict[str, Any]]:
    """The base emoji with a Twitter image present, in the file's order."""
    entries = json.loads((package_dir / "emoji.json").read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise DataError(f"{package_dir / 'emoji.json'}: expected a list of emoji entries")
    image_dir = package_dir / "img" / "twitter" / "64"
    return [
        e
        for e in entries
        if e.get("has_img_twitter")
        and e.get("name")
        and e.get("category") not in EXCLUDED_CATEGORIES
        and (image_dir / str(e.get("image"))).is_file()
    ]


def _icon(path: Path) -> Image.Image:
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def make(context: BuildContext, assets: Mapping[str, Path]) -> dict[str, list[Sample]]:
    """Assign every usable emoji to one split (seeded); the answer is its category."""
    package_dir = assets["twemoji"].parent
    entries = usable_entries(package_dir)
    if len(entries) < 3 * EVAL_SIZE:
        raise DataError(f"{package_dir}: only {len(entries)} usable emoji, need at least {3 * EVAL_SIZE}")
    order = [entries[k] for k in context.rng("assignment").permutation(len(entries))]
    parts = {
        "val": order[:EVAL_SIZE],
        "test": order[EVAL_SIZE : 2 * EVAL_SIZE],
        "train": order[2 * EVAL_SIZE :],
    }
    samples: dict[str, list[Sample]] = {}
    for split, part in parts.items():
        samples[split] = []
        for entry in part[: context.size(split, len(part))]:
            stem = str(entry["image"]).removesuffix(".png")
            path = context.save_image(
                split, stem, _icon(package_dir / "img" / "twitter" / "64" / entry["image"])
            )
            samples[split].append(Sample(path, QUESTION, str(entry["category"])))
    return {split: samples[split] for split in ("train", "val", "test")}


BUILDER = DatasetBuilder(
    name="emoji",
    description="Twemoji icons: name the emoji's category (9 answers)",
    source="npm emoji-datasource-twitter@16.0.0",
    licence="images CC-BY 4.0 (Twemoji), metadata MIT",
    assets=("twemoji",),
    default_sizes={"train": None, "val": EVAL_SIZE, "test": EVAL_SIZE},
    make=make,
)

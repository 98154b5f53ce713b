"""OCR: "What word is written?" about one large rendered word; the answer is the exact word.

Images are drawn with PIL and the DejaVu fonts of the Debian package ``fonts-dejavu-core`` (the six
files of :data:`FONT_FILES`, from :data:`FONT_DIR`; Bitstream Vera licence): a lower-case word of the
built-in list :data:`WORDS` (12 common words of 3-5 letters), in a random font at a large size (the
word spans most of the image width: :data:`MIN_FONT_SIZE`-:data:`MAX_FONT_SIZE` px, shrunk only to
fit), random text and background colours (contrast guaranteed), a random position, a small rotation
and, for half of the images, light pixel noise, on a :data:`IMAGE_SIZE` px square. Every word is in
every split (each split renders its own random fonts, sizes, colours and positions), so the test words
are learnable from train. Only the core fonts are used, so the images are the same on every machine
with that package (and the same FreeType).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample
from asymlora.errors import MissingAssetError

QUESTION = "What word is written?"
IMAGE_SIZE = 112
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
)
MIN_CONTRAST = 100.0  # smallest |luma(text) - luma(background)|, on 0-255
MAX_ROTATION = 5.0  # degrees
MIN_FONT_SIZE, MAX_FONT_SIZE = 40, 56  # px, before shrinking to fit

# The words that OCR images show: short, common, four of each length (3, 4 and 5 letters), with twelve
# different first letters, so that a partly read word is already closer to the right answer (character
# error rate).
WORDS: tuple[str, ...] = (
    "cat", "sun", "owl", "box",
    "fish", "moon", "tree", "kite",
    "apple", "queen", "zebra", "bread",
)


def find_fonts(font_dir: Path = FONT_DIR) -> list[Path]:
    """The DejaVu core fonts present in ``font_dir``; MissingAssetError naming the package if none is."""
    fonts = [font_dir / name for name in FONT_FILES if (font_dir / name).is_file()]
    if not fonts:
        raise MissingAssetError(
            f"no DejaVu font found in {font_dir} (looked for {', '.join(FONT_FILES)}). "
            "Run: apt-get install fonts-dejavu-core"
        )
    return fonts


def luma(colour: tuple[int, int, int]) -> float:
    """ITU-R BT.601 luma of an RGB colour, 0-255."""
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue


def random_text(rng: np.random.Generator) -> str:
    """A word of :data:`WORDS`, uniformly at random."""
    return str(WORDS[int(rng.integers(len(WORDS)))])


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in rng.integers(0, 256, size=3))
    return red, green, blue


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A (text, background) pair of random colours whose lumas differ by at least MIN_CONTRAST."""
    background = _colour(rng)
    for _ in range(100):
        text = _colour(rng)
        if abs(luma(text) - luma(background)) >= MIN_CONTRAST:
            return text, background
    return ((0, 0, 0) if luma(background) > 127 else (255, 255, 255)), background


def render(text: str, font_path: Path, rng: np.random.Generator) -> Image.Image:
    """Draw ``text`` rotated and placed at random on a square background (see the module docstring)."""
    colour, background = _colours(rng)
    size = int(rng.integers(MIN_FONT_SIZE, MAX_FONT_SIZE + 1))
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    while True:
        font = ImageFont.truetype(str(font_path), size)
        left, top, right, bottom = font.getbbox(text)
        layer = Image.new("RGBA", (right - left + 8, bottom - top + 8), (*colour, 0))
        ImageDraw.Draw(layer).text((4 - left, 4 - top), text, font=font, fill=(*colour, 255))
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(*colour, 0))
        if max(layer.size) <= IMAGE_SIZE - 4 or size <= 8:
            break
        size -= 2
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (*background, 255))
    x = int(rng.integers(0, max(1, IMAGE_SIZE - layer.width + 1)))
    y = int(rng.integers(0, max(1, IMAGE_SIZE - layer.height + 1)))
    canvas.alpha_composite(layer, (x, y))
    image = canvas.convert("RGB")
    if rng.random() < 0.5:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def make(context: BuildContext, assets: Mapping[str, Path]) -> dict[str, list[Sample]]:
    """Render each split's texts from its own random stream."""
    fonts = find_fonts(Path(os.environ.get("ASYMLORA_FONT_DIR", FONT_DIR)))
    samples: dict[str, list[Sample]] = {}
    for split in ("train", "val", "test"):
        rng = context.rng("samples", split)
        samples[split] = []
        for index in range(context.size(split)):
            text = random_text(rng)
            font = fonts[int(rng.integers(len(fonts)))]
            path = context.save_image(split, f"{index:05d}", render(text, font, rng))
            samples[split].append(Sample(path, QUESTION, text))
    return samples


BUILDER = DatasetBuilder(
    name="ocr",
    description="large rendered words (40): read the exact word",
    source="PIL + Debian fonts-dejavu-core",
    licence="generated; DejaVu fonts: Bitstream Vera licence",
    assets=(),
    default_sizes={"train": 4000, "val": 500, "test": 500},
    make=make,
)

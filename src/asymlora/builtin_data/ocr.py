"""OCR: "What does the text say?" about a rendered word or number; the answer is the exact text.

Images are drawn with PIL and the DejaVu fonts of the Debian package ``fonts-dejavu-core`` (the six
files of :data:`FONT_FILES`, from :data:`FONT_DIR`; Bitstream Vera licence): a word from the built-in
list :data:`WORDS` (lower case, capitalised or upper case) or a number (integer or decimal), with a
random font, size, text colour, background colour (contrast guaranteed), position, small rotation and,
for half of the images, light pixel noise, on a :data:`IMAGE_SIZE` px square. Only the core fonts are
used, so the images are the same on every machine with that package (and the same FreeType).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample
from asymlora.errors import MissingAssetError

QUESTION = "What does the text say?"
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
MAX_ROTATION = 10.0  # degrees

_WORD_TEXT = """
    apple river stone cloud window garden orange yellow purple silver golden bright quiet little
    green house table chair bread water light night music paper pencil rabbit tiger horse mouse
    lemon grape melon cherry peach honey sugar salt pepper butter cheese coffee tea milk juice
    bottle glass plate spoon knife fork kitchen bedroom garage school office market street road
    bridge tower castle palace village city country island forest desert ocean lake beach mountain
    valley meadow field farm barn fence gate door key lock clock watch phone camera laptop screen
    mirror candle lamp carpet pillow blanket basket bucket ladder hammer shovel rope chain wheel
    engine train plane rocket boat ship truck bicycle wagon ticket letter stamp parcel card gift
    party dance song story poem novel film theatre circus museum library garden park zoo
    doctor nurse pilot farmer baker tailor artist singer writer player driver teacher student
    friend family mother father sister brother uncle cousin baby child people person neighbour
    winter spring summer autumn morning evening sunday monday friday today tomorrow yesterday
    north south east west left right middle corner centre circle square triangle arrow star
    heart diamond crown shield sword dragon wizard giant robot planet comet galaxy moon sun
    rain snow storm thunder wind fog frost ice fire smoke ash dust sand mud clay brick wood
    metal iron copper steel plastic cotton wool silk leather rubber velvet marble crystal pearl
    happy sad angry calm brave proud gentle clever honest lucky funny strange simple quick slow
    early late open closed empty full heavy light warm cold sweet sour bitter fresh dry wet
    jump run walk swim climb read write draw paint sing laugh smile sleep dream think listen
    build carry catch throw kick push pull lift shake bend fold cut mix pour bake cook wash
    number answer question problem reason result idea plan secret signal message picture
    shadow mirror memory silence wonder voice sound noise echo rhythm melody harmony chorus
    button pocket collar sleeve jacket scarf glove boot sock hat helmet ribbon zipper needle
    violin guitar piano drum flute trumpet organ harp banjo cello whistle bell
    tomato potato carrot onion garlic bean pea corn rice wheat oat barley pumpkin cabbage
    eagle falcon parrot pigeon swan duck goose owl crow robin sparrow penguin turtle lizard
    shark whale dolphin salmon trout crab lobster octopus spider beetle ant bee wasp moth
"""
# The words that OCR images show (duplicates in the text above are dropped, order kept).
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


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
    """A word of :data:`WORDS` in one of three casings (70%) or an integer or decimal number (30%)."""
    if rng.random() < 0.7:
        word = str(WORDS[int(rng.integers(len(WORDS)))])
        casing = rng.random()
        return word if casing < 0.6 else word.capitalize() if casing < 0.85 else word.upper()
    if rng.random() < 0.7:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    return f"{int(rng.integers(0, 1000))}.{int(rng.integers(0, 100)):02d}"


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
    size = int(rng.integers(16, 31))
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
    description="rendered words and numbers: read the exact text",
    source="PIL + Debian fonts-dejavu-core",
    licence="generated; DejaVu fonts: Bitstream Vera licence",
    assets=(),
    default_sizes={"train": 4000, "val": 500, "test": 500},
    make=make,
)

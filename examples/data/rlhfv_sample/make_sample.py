"""Rebuild the bundled RLHF-V-layout sample in this folder: ``images/*.jpg`` and ``train.jsonl``.

Every picture is a real photograph that ships inside the scikit-image or matplotlib wheel, so the sample
can be rebuilt without network access. The question/chosen/rejected texts and the object boxes were
written by looking at the saved (downscaled) images; they live in ``ROWS`` below.

Needs ``pip install scikit-image matplotlib`` (Pillow comes with matplotlib). Neither package is needed to
run the pipeline on the sample; this script only exists so the data can be reproduced:

    python examples/data/rlhfv_sample/make_sample.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DS_NAME = "mfpo-sample"
ORIGIN_SPLIT = "sample_data"
MAX_SIDE = 320  # longest side of a saved image, in pixels (never upscaled)
JPEG_QUALITY = 90

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the saved image; x1/y1 exclusive


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _motorcycle(view: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return data.stereo_motorcycle()[view]

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


@dataclass(frozen=True)
class Source:
    origin_dataset: str  # the library the photograph ships in
    image_path: str  # the file's name inside that library
    load: Callable[[], np.ndarray]


# Saved name (images/<name>.jpg) -> where the photograph comes from. All of these ship inside the wheels;
# skimage.data images that are downloaded on first use (eagle, lily, skin, ...) are deliberately absent.
SOURCES: dict[str, Source] = {
    "astronaut": Source("scikit-image", "astronaut.png", _skimage("astronaut")),
    "brick": Source("scikit-image", "brick.png", _skimage("brick")),
    "camera": Source("scikit-image", "camera.png", _skimage("camera")),
    "cell": Source("scikit-image", "cell.png", _skimage("cell")),
    "chelsea": Source("scikit-image", "chelsea.png", _skimage("chelsea")),
    "clock": Source("scikit-image", "clock_motion.png", _skimage("clock")),
    "coffee": Source("scikit-image", "coffee.png", _skimage("coffee")),
    "coins": Source("scikit-image", "coins.png", _skimage("coins")),
    "grass": Source("scikit-image", "grass.png", _skimage("grass")),
    "gravel": Source("scikit-image", "gravel.png", _skimage("gravel")),
    "hubble_deep_field": Source("scikit-image", "hubble_deep_field.jpg", _skimage("hubble_deep_field")),
    "immunohistochemistry": Source("scikit-image", "ihc.png", _skimage("immunohistochemistry")),
    "microaneurysms": Source("scikit-image", "microaneurysms.png", _skimage("microaneurysms")),
    "moon": Source("scikit-image", "moon.png", _skimage("moon")),
    "motorcycle_left": Source("scikit-image", "motorcycle_left.png", _motorcycle(0)),
    "motorcycle_right": Source("scikit-image", "motorcycle_right.png", _motorcycle(1)),
    "page": Source("scikit-image", "page.png", _skimage("page")),
    "retina": Source("scikit-image", "retina.jpg", _skimage("retina")),
    "rocket": Source("scikit-image", "rocket.jpg", _skimage("rocket")),
    "text": Source("scikit-image", "text.png", _skimage("text")),
    "grace_hopper": Source("matplotlib", "grace_hopper.jpg", _grace_hopper),
}


@dataclass(frozen=True)
class Row:
    image: str  # key of SOURCES
    question: str
    chosen: str  # faithful answer
    rejected: str  # fluent answer that hallucinates a wrong object, colour or detail
    annotations: tuple[tuple[str, Box], ...]  # (label of the key object, its box in the saved image)


ROWS: tuple[Row, ...] = (
    Row(
        "astronaut",
        "What is the astronaut holding in the lower right of the photo?",
        "She is holding a white space-suit helmet with a large, dark, reflective visor.",
        "She is holding a small model of the space shuttle, painted white and orange, in her right hand.",
        (("helmet", (173, 215, 320, 320)),),
    ),
    Row(
        "astronaut",
        "What object stands in the background on the right side of the photo?",
        "A model of the space shuttle, with the orbiter attached to its orange external tank and two white boosters.",
        "A small globe of the Earth on a wooden stand, placed next to a framed crew photograph.",
        (("space shuttle model", (220, 0, 285, 176)),),
    ),
    Row(
        "astronaut",
        "Which flag hangs behind the astronaut on the left?",
        "The flag of the United States, with white stars on a blue field and red and white stripes.",
        "The NASA flag, a plain blue banner with the white NASA logo printed in its centre.",
        (("american flag", (0, 0, 60, 320)),),
    ),
    Row(
        "chelsea",
        "What animal is shown in this close-up photo?",
        "A tabby cat, seen up close, with striped brown fur, long white whiskers and yellow-green eyes.",
        "A young tiger cub with bright orange fur, bold black stripes and blue eyes, resting in tall grass.",
        (("cat", (0, 0, 285, 213)),),
    ),
    Row(
        "chelsea",
        "What colour are the cat's eyes?",
        "The cat's eyes are a yellowish green, with large, round, dark pupils.",
        "The cat's eyes are a bright sky blue, with narrow vertical slit pupils.",
        (("cat eye", (96, 58, 150, 107)), ("cat eye", (207, 77, 247, 121))),
    ),
    Row(
        "coffee",
        "What drink is in the cup on the saucer?",
        "Espresso coffee with a light brown crema, served in a small red cup that is white on the inside.",
        "Green tea with a thin slice of lemon floating on top, served in a tall white porcelain mug.",
        (("coffee cup", (91, 9, 218, 166)),),
    ),
    Row(
        "coffee",
        "What utensil is resting on the saucer next to the cup?",
        "A small, shiny metal teaspoon, lying on the red saucer beside the cup.",
        "A silver cake fork and a folded paper napkin, lying on the saucer beside the cup.",
        (("teaspoon", (171, 35, 227, 175)),),
    ),
    Row(
        "rocket",
        "What is standing upright on the launch pad in the centre of the picture?",
        "A tall white rocket, standing between the launch towers and lit by floodlights against the evening sky.",
        "A space shuttle with its orange fuel tank, lifting off in a huge cloud of smoke and flame.",
        (("rocket", (151, 64, 170, 208)),),
    ),
    Row(
        "camera",
        "What is the man in the dark coat looking into?",
        "He is looking into a camera that is mounted on a tripod in front of him.",
        "He is looking through a pair of binoculars that he holds up to his eyes with both hands.",
        (("camera", (157, 85, 205, 117)),),
    ),
    Row(
        "camera",
        "What is the camera mounted on?",
        "It is mounted on a tall metal tripod whose three legs stand on the grass.",
        "It is mounted on a wooden fence post at the edge of the lawn, next to a bench.",
        (("tripod", (143, 120, 252, 320)),),
    ),
    Row(
        "clock",
        "What round object is shown on the wall?",
        "A round wall clock, so blurred by camera motion that its face and hands cannot be read.",
        "A decorative plate hanging on the wall, painted with blue flowers around its rim.",
        (("wall clock", (113, 76, 228, 173)),),
    ),
    Row(
        "coins",
        "What are the round objects laid out in rows on the dark background?",
        "They are ancient coins, two dozen of them in four rows, each stamped with a worn relief design.",
        "They are round sewing buttons pinned to dark fabric, each with four small holes in the centre.",
        (("coins", (14, 11, 318, 243)),),
    ),
    Row(
        "cell",
        "What is the bright round object on the right side of this microscope image?",
        "It is a single cell, seen as a bright disc surrounded by a dark halo on the grey background.",
        "It is an air bubble trapped under the cover slip, outlined by a thin bright ring.",
        (("cell", (176, 149, 240, 212)),),
    ),
    Row(
        "brick",
        "What is the surface in this picture made of?",
        "It is a wall of rectangular bricks laid in rows, separated by light-coloured lines of mortar.",
        "It is a wooden floor of long planks, with dark knots and nail heads along the boards.",
        (("brick wall", (0, 0, 320, 320)),),
    ),
    Row(
        "grass",
        "What covers the ground in this picture?",
        "The ground is covered in a dense tangle of grass blades, seen from close above.",
        "The ground is covered in a thick layer of fresh snow, with a few footprints pressed into it.",
        (("grass", (0, 0, 320, 320)),),
    ),
    Row(
        "gravel",
        "What is the ground covered with?",
        "It is covered with gravel: many small, angular stones of similar size packed closely together.",
        "It is covered with a heap of roasted coffee beans, dark brown and glossy with oil.",
        (("gravel", (0, 0, 320, 320)),),
    ),
    Row(
        "hubble_deep_field",
        "What is the bright, yellowish object to the right of the centre of this image?",
        "It is a galaxy, one of the brightest of the many small, colourful galaxies scattered across the dark sky.",
        "It is the planet Saturn, with its rings clearly visible around a pale yellow disc.",
        (("galaxy", (224, 144, 241, 161)),),
    ),
    Row(
        "immunohistochemistry",
        "What is the brown-stained, rounded structure at the bottom centre of this tissue image?",
        "It is a gland whose epithelial cells are stained brown, surrounded by pale tissue with blue-stained nuclei.",
        "It is a blood vessel packed with red blood cells, surrounded by bright pink bands of muscle fibre.",
        (("gland", (158, 195, 236, 320)),),
    ),
    Row(
        "moon",
        "What is the round feature near the top left of this view of the lunar surface?",
        "It is a small impact crater, lit from one side so that one half of its bowl is bright and the other dark.",
        "It is a lunar landing module standing on its four legs, with a flag planted beside it.",
        (("crater", (58, 39, 92, 70)),),
    ),
    Row(
        "page",
        "What is the heading at the top of the page?",
        'The heading reads "Region-based segmentation", printed in large type above the paragraph.',
        'The heading reads "Introduction to Image Processing", printed in bold type above the paragraph.',
        (("heading", (4, 9, 244, 29)),),
    ),
    Row(
        "retina",
        "What is the bright yellowish disc on the left side of this photograph of the back of the eye?",
        "It is the optic disc, where the optic nerve leaves the eye; the retinal blood vessels branch out from it.",
        "It is a cataract, a cloudy white patch on the lens that covers the pupil in the middle of the eye.",
        (("optic disc", (25, 128, 75, 175)),),
    ),
    Row(
        "text",
        "What is drawn with a long diagonal stroke in the lower left part of the paper?",
        "An arrow drawn in dark ink, running diagonally up and to the right across the ruled lines.",
        "A thick red underline beneath a printed title, running straight across the page.",
        (("arrow", (3, 63, 113, 102)),),
    ),
    Row(
        "motorcycle_left",
        "What vehicle is parked in the garage?",
        "A red motorcycle with a black seat and a chrome engine, propped up on its stand.",
        "A blue bicycle with a wicker basket on the handlebars, leaning against the wall.",
        (("motorcycle", (37, 27, 296, 197)),),
    ),
    Row(
        "motorcycle_right",
        "What red object sits on the shelves behind the front of the motorcycle?",
        "A red plastic storage bin, sitting on a shelf next to cardboard boxes.",
        "A red fire extinguisher, hanging on the wall next to a coiled green garden hose.",
        (("storage bin", (215, 77, 257, 111)),),
    ),
    Row(
        "grace_hopper",
        "What is the woman wearing on her head?",
        "A dark naval officer's cap with a large gold badge and gold leaf embroidery on the front.",
        "A red knitted winter hat with a folded brim and a fluffy white pom-pom on top.",
        (("cap", (79, 11, 199, 86)),),
    ),
    Row(
        "grace_hopper",
        "What is the woman wearing over her eyes?",
        "A pair of glasses with dark upper rims and pale, light brown lower frames.",
        "A pair of dark, wraparound sunglasses with mirrored, reflective lenses.",
        (("glasses", (93, 91, 191, 121)),),
    ),
    Row(
        "grace_hopper",
        "What is pinned to the right side of her jacket, as seen in the photo?",
        "A bar of small, colourful military service ribbons, arranged in two rows.",
        "A large gold star-shaped medal hanging from a long, striped blue ribbon.",
        (("service ribbons", (172, 259, 243, 281)),),
    ),
    Row(
        "microaneurysms",
        "What is the dark line running across the middle of this close-up of the retina?",
        "It is a small retinal blood vessel, winding from the left edge to the right edge of the image.",
        "It is a strand of hair lying across the camera lens, casting a sharp black shadow.",
        (("blood vessel", (0, 46, 102, 57)),),
    ),
)


def prepare(rgb: np.ndarray) -> Image.Image:
    """RGB (grey images are repeated), longest side at most MAX_SIDE, Lanczos."""
    img = Image.fromarray(rgb).convert("RGB")
    scale = min(1.0, MAX_SIDE / max(img.size))
    if scale < 1.0:
        size = (round(img.width * scale), round(img.height * scale))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def check_box(name: str, box: Box, size: tuple[int, int]) -> None:
    x0, y0, x1, y1 = box
    width, height = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{name}: box {box} does not fit the {width}x{height} image")


def build(out: Path) -> int:
    """Write out/images/*.jpg and out/train.jsonl; returns the number of rows."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    for name, source in SOURCES.items():
        img = prepare(source.load())
        img.save(images / f"{name}.jpg", format="JPEG", quality=JPEG_QUALITY)  # Pillow writes no EXIF
        sizes[name] = img.size

    lines = []
    for idx, row in enumerate(ROWS):
        source = SOURCES[row.image]
        for label, box in row.annotations:
            check_box(f"row {idx} ({label})", box, sizes[row.image])
        pair = {"question": row.question, "chosen": row.chosen, "rejected": row.rejected}
        text = json.dumps(pair, ensure_ascii=False)
        record = {
            "idx": idx,
            "ds_name": DS_NAME,
            "image": f"images/{row.image}.jpg",
            "text": text,
            "origin_dataset": source.origin_dataset,
            "origin_split": ORIGIN_SPLIT,
            "image_path": source.image_path,
            "annotations": [{"label": label, "box": list(box)} for label, box in row.annotations],
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write images/ and train.jsonl to")
    args = parser.parse_args()
    n = build(args.out)
    print(f"wrote {n} rows and {len(SOURCES)} images to {args.out}")


if __name__ == "__main__":
    main()

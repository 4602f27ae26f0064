"""Command line: classify handwritten digit images with a trained checkpoint.

    python -m mnist_flax.predict CHECKPOINT_OR_DIR IMAGE [IMAGE ...] [--json]

Each PNG or JPEG is turned into what the network was trained on, the way MNIST
itself was made: 28x28 grayscale, a white digit on black, the digit scaled so
its longer side is 20 px, and placed so its centre of mass is at the centre.

  * Colour and transparency: converted to grayscale; transparent pixels take a
    background colour opposite to the ink's, so a digit on a transparent canvas works.
  * Black on white (a scan, a photo of paper, a drawing app): detected when the
    image's one-pixel border is on average brighter than mid-grey (> 127), and
    inverted; the output line then ends in "(inverted)" (JSON: "inverted": true).
  * The background level (median of the border) is subtracted and the contrast
    stretched, the digit cropped to its bounding box, scaled (aspect kept) to 20 px,
    and padded into 28x28 centred by centre of mass.
  * An image that is already 28x28 is taken to be MNIST-formatted and used as is
    (only inverted if its border is bright), so MNIST digits saved as PNG are
    classified exactly as the raw test arrays.

All images go through the network in one eval-mode batch. A file that cannot be
read gets one error line on stderr; the others are still classified, and the
exit status is 1.
"""

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_flax import checkpoint, cli
from mnist_flax.errors import ImageError, missing_path

FORMATS = ["PNG", "JPEG"]
MAX_PIXELS = 50_000_000  # a 50-megapixel photo is plenty for one digit
SIDE = 28  # MNIST's field
FIT = 20  # ... and the box MNIST fits each digit into
INVERT_ABOVE = 127  # mean border brightness that means "dark ink on a light background"
INK_FRACTION = 0.25  # of the stretched range: what counts as ink for the bounding box
MIN_CONTRAST = 24  # grey levels between background and the brightest ink; less is a blank image
CENTRE_DECIMALS = 6  # of a pixel: a centre of mass this close to half-way is taken to be there


class Prepared(NamedTuple):
    image: np.ndarray  # uint8 (28, 28), white on black
    inverted: bool


def read_grayscale(source: str | Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """The image (a path, or an open binary file such as an upload) as uint8 (H, W) grayscale.

    ImageError, naming it `name` (default: the path), if it is not a readable PNG/JPEG.
    """
    path = source if name is None else name
    try:
        with Image.open(source, formats=FORMATS) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{path}: {im.width}x{im.height} is too large for a digit image (over "
                                 f"{MAX_PIXELS:,} pixels); scale it down")
            im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                return flatten_alpha(np.asarray(im.convert("RGBA").convert("LA"), np.float32))
            return np.asarray(im.convert("L"), np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{missing_path(path)}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable PNG or JPEG image (not a valid file of either format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError; truncated data raises OSError or SyntaxError.
        raise ImageError(f"{path}: not a readable PNG or JPEG image ({e})") from None


def flatten_alpha(la: np.ndarray) -> np.ndarray:
    """(H, W, 2) luminance+alpha -> uint8 (H, W), over a background contrasting with the ink."""
    lum, alpha = la[..., 0], la[..., 1] / 255.0
    if alpha.min() >= 1.0:
        return lum.astype(np.uint8)
    ink = np.sum(lum * alpha) / max(np.sum(alpha), 1e-6)
    background = 0.0 if ink > INVERT_ABOVE else 255.0
    return np.round(lum * alpha + background * (1 - alpha)).astype(np.uint8)


def border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def to_mnist(gray: np.ndarray, source: str = "image") -> Prepared:
    """uint8 (H, W) grayscale -> MNIST's 28x28 white-on-black format (see the module docstring)."""
    inverted = bool(border(gray).mean() > INVERT_ABOVE)
    if inverted:
        gray = 255 - gray
    if gray.shape == (SIDE, SIDE):
        return Prepared(gray.astype(np.uint8), inverted)
    x = np.clip(gray.astype(np.float32) - np.median(border(gray)), 0, None)
    if x.max() < MIN_CONTRAST:
        raise ImageError(f"{source}: no digit found (the image is blank or nearly uniform)")
    x *= 255.0 / x.max()
    rows, cols = np.nonzero(x > INK_FRACTION * 255)
    crop = x[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = FIT / max(crop.shape)
    h, w = (max(1, round(n * scale)) for n in crop.shape)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.Resampling.LANCZOS))
    small = np.clip(small, 0, 255)
    return Prepared(center_by_mass(small), inverted)


def center_by_mass(patch: np.ndarray) -> np.ndarray:
    """Pads a (h, w) patch (h, w <= 20) into 28x28 with its centre of mass at pixel (14, 14).

    (14, 14) is where the MNIST test digits' centre of mass lies on average. The offsets are
    rounded to CENTRE_DECIMALS first, so that a symmetric digit, whose centre lies exactly
    half-way, goes to the even offset (as round does) wherever the sums' last bits fall:
    prepare.js then places it where this does.
    """
    h, w = patch.shape
    mass = patch.astype(np.float64)
    total = max(float(mass.sum()), 1e-6)
    cy = float(mass.sum(1) @ np.arange(h)) / total
    cx = float(mass.sum(0) @ np.arange(w)) / total
    top = int(np.clip(round(round(SIDE / 2 - cy, CENTRE_DECIMALS)), 0, SIDE - h))
    left = int(np.clip(round(round(SIDE / 2 - cx, CENTRE_DECIMALS)), 0, SIDE - w))
    canvas = np.zeros((SIDE, SIDE), np.float32)
    canvas[top:top + h, left:left + w] = patch
    return np.round(canvas).astype(np.uint8)


def prepare(source: str | Path | BinaryIO, name: str | None = None) -> Prepared:
    """A PNG/JPEG file (path or open binary file) as the 28x28 image the network classifies.

    The one preprocessing of every user image: this command and mnist_flax.serve call it.
    """
    name = str(source) if name is None else name
    return to_mnist(read_grayscale(source, name), name)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.predict", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_DIR", help="a .msgpack written by mnist_flax.train "
                   "(or export --from-torch), or a directory (its newest one is used)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG or JPEG files, one digit each")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of one line per file")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if not args.images:  # argparse's own message would not say which argument is missing: the image, or the checkpoint
        raise cli.UsageError(f"no IMAGE given: the first argument is the checkpoint (or a directory of them), "
                             f"the images come after it: {p.prog} CHECKPOINT_OR_DIR IMAGE [IMAGE ...]")
    variables, record = checkpoint.load_checkpoint(args.checkpoint)  # a file that is no checkpoint: refused before JAX
    files, prepared, failures = [], [], 0
    for path in args.images:
        try:
            prepared.append(prepare(path))
            files.append(path)
        except ImageError as e:
            if args.debug:
                raise
            print(f"mnist_flax: error: {e}", file=sys.stderr)
            failures += 1
    results = []
    if prepared:
        # Imported only now: the model takes a second that --help, a bad flag, a file that is no
        # checkpoint and images that are all unreadable need not wait for.
        from mnist_flax import step

        images = np.stack([p.image for p in prepared])[..., None]
        probs = step.predict_probabilities(variables, images, batch_size=len(images),  # one pass
                                           model=checkpoint.network_for(record))
        for path, prep, row in zip(files, prepared, probs):
            digit = int(np.argmax(row))
            results.append({"file": path, "digit": digit, "probability": float(row[digit]),
                            "probabilities": [float(v) for v in row], "inverted": prep.inverted})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            note = " (inverted)" if r["inverted"] else ""
            print(f"{r['file']}: digit {r['digit']} (p={r['probability']:.3f}){note}")
    return cli.EXIT_FAILURE if failures else 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()

"""THE image reader: every path that turns an image file into pixels for a model goes through `open_image`.

P1 prediction, P2 training, P2 validation, `hw3_2.sh` and P3 all read images here, so one file gives the same
pixels everywhere. The choices, made once:
- No EXIF orientation: the stored pixels are used as they are. The course's scorer (CLIPScore) reads images that
  way, and COCO/Flickr captions were written by people looking at browsers that ignored EXIF orientation.
- Full-size decoding, no JPEG draft mode: drafting decodes a big JPEG at 1/2, 1/4 or 1/8 scale, which gives other
  pixels than a full decode followed by the encoder's resize (the path the scorer takes).
- Every mode becomes 8-bit RGB: 16/32-bit grey is scaled (not clipped) to 8 bits, transparency is composited on
  white, palette, CMYK and grey images are converted by PIL.
The scorer (hw3/p2/metrics.py) deliberately reads images exactly as the course's p2_evaluate.py does instead.

Which files of a folder are images is decided once too, for P1 and P2 alike: those whose suffix PIL can read
(IMAGE_SUFFIXES: .png, .jpg/.jpeg, .webp, .bmp, .gif, .tif ...). Every other entry is skipped with a warning line
naming it (so a stray notes.txt or .DS_Store never becomes a prediction key), and a file with an image suffix that
does not decode is reported by the CLI that reads it.
"""
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hw3.common.errors import UserError

# Accept big photos (PIL's default bomb guard starts warning at 89M pixels); beyond this they are reported as bad.
Image.MAX_IMAGE_PIXELS = 500_000_000
Image.init()  # registers every format PIL has, so the list below is complete
IMAGE_SUFFIXES = tuple(sorted(suffix for suffix, format in Image.registered_extensions().items()
                              if format in Image.OPEN))
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def open_image(path) -> Image.Image:
    """An 8-bit RGB image of the file's stored pixels (see the module docstring for the choices)."""
    with Image.open(path) as image:
        image.load()
        if image.mode in _WIDE_GREY_MODES:  # convert("RGB") would clip 16-bit values at 255
            array = np.asarray(image, dtype=np.float32)
            scale = 255 / 65535 if array.max() > 255 else 1.0
            return Image.fromarray(np.clip(array * scale, 0, 255).round().astype(np.uint8)).convert("RGB")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            background.alpha_composite(rgba)
            return background.convert("RGB")
        return image.convert("RGB")


def list_image_files(folder) -> List[Path]:
    """The files directly in `folder` with an image suffix (any case), sorted by name. Every other entry
    (other files, subfolders) gets a warning line on stderr. Whether a file really decodes is found out when it is
    read."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    images = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            kind = "a folder" if path.is_dir() else "not an image by its suffix"
            print(f"warning: skipped {path.name} ({kind})", file=sys.stderr)
    return images


class ImageReadError(UserError):
    """An image file that cannot be decoded; the message names the file, in one line.

    Raised inside a DataLoader worker, it reaches the main process rebuilt by torch from one text: "Caught
    ImageReadError in DataLoader worker process N.", then the worker's whole traceback, whose last line is
    `hw3.common.images.ImageReadError: <message>`. The message is taken back from that line, so a CLI still ends in
    one error line."""

    def __init__(self, message: str):
        if re.match(r"Caught \w+ in DataLoader worker process \d+\.\n", message):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class ImageFiles(Dataset):
    """Image files -> transform(reader(path)), e.g. an encoder's preprocessing of `open_image`. An unreadable file
    raises ImageReadError naming it. `reader` exists for the scorer, which must read images the course's way."""

    def __init__(self, paths: Sequence, transform: Callable[[Image.Image], torch.Tensor],
                 reader: Callable[[str], Image.Image] = open_image):
        self.paths, self.transform, self.reader = list(paths), transform, reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. PIL's palette/bomb warnings: the image is still fine
                return self.transform(self.reader(path))
        except Exception as error:  # corrupt, truncated, not an image, too big
            raise ImageReadError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


class ReadableImageFiles(ImageFiles):
    """Like ImageFiles, but an item is (tensor, index, error message): an unreadable file gives a zero image
    [3, size, size] and the reason instead of an error, so one bad file does not stop a whole folder."""

    def __init__(self, paths: Sequence, transform: Callable[[Image.Image], torch.Tensor], size: int):
        super().__init__(paths, transform)
        self.size = size

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, str]:
        try:
            return super().__getitem__(index), index, ""
        except ImageReadError as error:
            cause = error.__cause__
            return torch.zeros(3, self.size, self.size), index, f"{type(cause).__name__}: {cause}"

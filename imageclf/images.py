"""Image files to pixels, the one way the whole project does it: preprocess (training data),
`imageclf predict`, the exported formats' checks and the web service all decode here, and resize
with the same operation as the model's own resize layer, so one photo gives one answer everywhere.
"""

from __future__ import annotations

import errno
import functools
import io
import os
from pathlib import Path

import numpy as np
from PIL import EpsImagePlugin, Image, ImageOps, UnidentifiedImageError

from imageclf.errors import PipelineError

# Pixels (width x height) above which a file is refused before it is decoded: a small PNG can
# unpack to gigabytes (a "decompression bomb"). 40 megapixels passes any phone photo.
DEFAULT_MAX_PIXELS = 40_000_000
# The check in `decode_image` replaces Pillow's process-wide guard, so that the limit can be
# set per call (and raised above Pillow's fixed 89 megapixels when a user asks for it).
Image.MAX_IMAGE_PIXELS = None

# Formats Pillow recognizes but cannot decode here: stubs waiting for a handler (BUFR, GRIB,
# HDF5, WMF outside Windows), MPEG (its header only), EPS without Ghostscript. A folder search
# would otherwise take `.h5` model files and `.mpg` videos for images.
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF"} | (
    set() if EpsImagePlugin.has_ghostscript() else {"EPS"}
)
# file names taken for images where a folder is searched: every extension of a format Pillow
# can decode
IMAGE_SUFFIXES = frozenset(
    suffix
    for suffix, kind in Image.registered_extensions().items()
    if kind in Image.OPEN and kind not in _UNDECODABLE
)

# what Pillow raises on files that are not images, truncated or otherwise corrupt
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


class BadImage(PipelineError):
    """A file or upload that is not a readable image, or is over the pixel limit."""


def decode_image(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    size: int | None = None,
    limit_name: str = "--max-pixels",
) -> np.ndarray:
    """Decode an image file (any format Pillow reads; the first frame of an animation) to
    uint8 RGB pixels, H x W x 3, upright as its EXIF orientation says.

    Grayscale, palette, CMYK and alpha images are converted to RGB (alpha dropped); 16-bit
    grayscale is scaled down to 8 bits. Float images ("F") are converted as Pillow does
    (values clipped to 0..255): their range has no convention to scale from.

    Args:
        source: the file's path, or its bytes (an upload).
        max_pixels: refuse images that would decode to more pixels than this, before
            decoding them.
        name: what error messages call the image (default: its path, or "image").
        size: the side the caller resizes the image to afterwards (a model's input). A JPEG
            much larger than that is decoded at 1/2, 1/4 or 1/8 of its size, as long as both
            sides stay at least `size`: libjpeg scales in its inverse DCT, which averages
            like an antialiased resize and skips most of the decoding work (a 640 x 480
            photo for a 32-pixel model: 80 x 60, 1.6x faster to decode). The pixel limit
            applies to that reduced size: a 48-megapixel phone photo decodes to 0.8.
        limit_name: the option or param that sets `max_pixels`, for the error message.

    Raises:
        BadImage: naming the image and what is wrong with it.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if size is not None:
                image.draft("RGB", (size, size))  # only JPEGs have a draft mode
            decoded_width, decoded_height = image.size
            if decoded_width * decoded_height > max_pixels:
                reduced = (
                    f", decoded at {decoded_width} x {decoded_height}"
                    if (decoded_width, decoded_height) != (width, height)
                    else ""
                )
                raise BadImage(
                    f"{label}: {width} x {height}{reduced} = "
                    f"{decoded_width * decoded_height:,} pixels, over the limit of "
                    f"{max_pixels:,}; shrink the image, or raise the limit ({limit_name})"
                )
            upright = ImageOps.exif_transpose(image)
            if upright.mode.startswith("I"):
                return _gray16_to_rgb(np.asarray(upright))
            return np.asarray(upright.convert("RGB"), dtype=np.uint8)
    # why it failed is worked out here, on the error path only: not for every good image
    except FileNotFoundError:
        raise BadImage(f"{label}: {_dangling_link(source) or 'no such file'}") from None
    except IsADirectoryError:
        raise BadImage(f"{label}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        if _is_empty(source):
            raise BadImage(f"{label}: empty file (0 bytes)") from None
        # Pillow's own message names its internal buffer object, not the file
        raise BadImage(
            f"{label}: not a readable image (no image format Pillow knows: PNG, JPEG, GIF, BMP, "
            "TIFF, WebP, ...)"
        ) from None
    except _UNREADABLE as exc:  # a loop of symbolic links among them
        detail = str(exc) or type(exc).__name__
        reason = _dangling_link(source) or f"not a readable image ({detail})"
        raise BadImage(f"{label}: {reason}") from None


def _dangling_link(source: bytes | str | Path) -> str | None:
    """Why `source` leads to no file, if it is a symbolic link that does not."""
    if isinstance(source, bytes) or not Path(source).is_symlink() or Path(source).exists():
        return None
    return broken_link(Path(source))


def _is_empty(source: bytes | str | Path) -> bool:
    return len(source) == 0 if isinstance(source, bytes) else Path(source).stat().st_size == 0


def broken_link(path: Path) -> str:
    """Why the symbolic link `path` leads to no file or folder."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links; point it at a file or folder"
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


def _gray16_to_rgb(gray: np.ndarray) -> np.ndarray:
    """16-bit grayscale (Pillow's "I;16*" modes, and "I", where its readers put 16-bit
    samples) to uint8 RGB. Pillow's own convert clips at 255, which turns almost every pixel
    white; 0..65535 scaled by 255/65535 instead gives back exactly the 8-bit picture that was
    saved as 16 bits by the usual x 257."""
    wide = np.clip(gray, 0, 65535).astype(np.uint32)
    eight = ((wide + 128) // 257).astype(np.uint8)  # rounded to the nearest level
    return np.repeat(eight[..., None], 3, axis=-1)


def resize_images(images: np.ndarray, size: int, chunk: int = 1000) -> np.ndarray:
    """`images` (uint8, N x H x W x 3) resized to `size` x `size` by the operation the model's
    "resize" layer applies (bilinear with antialiasing), rounded back to uint8."""
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    resize = _resizer(size)
    parts = [
        np.clip(np.rint(np.asarray(resize(images[i : i + chunk].astype(np.float32)))), 0, 255)
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(parts).astype(np.uint8)


@functools.cache
def _resizer(size: int):
    # one layer per size for the whole process: preprocess resizes photos one at a time
    return resize_layer(size)


def resize_layer(size: int, name: str = "resize"):
    """The Keras layer that resizes images inside every model, and in preprocess: bilinear with
    antialiasing, so that photos much larger than the model's input are not aliased. On images
    already `size` x `size` it is the identity."""
    # imported here: reading a dataset that needs no resizing should not load TensorFlow
    import keras

    return keras.layers.Resizing(size, size, antialias=True, name=name)

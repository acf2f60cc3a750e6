"""Images in OpenAI chat requests for a VLM bundle: `image_url` parts whose URL is a data: URI
(`data:image/png;base64,...`), decoded with Pillow and resized to the bundle's fixed image size.

URLs that point elsewhere (http, https, file) are refused: the server reads nothing outside its
bundle and the request. Resizing: a VLM bundle's vision engine takes one image size (its manifest's
`image_height` × `image_width`); other sizes are resized to it with bicubic resampling, as
`enginekit generate --resize` does, which changes the aspect ratio of an image of another shape.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import numpy as np

from .._deps import require
from .openai_protocol import ApiError

_DATA_URI = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,(.*)$", re.S)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a decompression bomb is refused before it is decoded


def decode_image_url(url: str, size: tuple[int, int], param: str) -> np.ndarray:
    """An HxWx3 uint8 array at `size` (height, width) from a data: URI; ApiError 400 otherwise."""
    m = _DATA_URI.match(url)
    if m is None:
        shown = url.split(":", 1)[0] + ":" if ":" in url[:12] else url[:40]
        raise ApiError(
            f"Expected the image URL to be a data: URI (data:image/png;base64,...), found '{shown}…': this server "
            "reads nothing outside its bundle and the request. Download the image and send it inline, base64-encoded.",
            400, param=param)
    if ";base64" not in (m.group(2) or ""):
        raise ApiError("Expected a base64 data: URI (data:image/png;base64,...), found one without ';base64'. Encode "
                       "the image bytes with base64.", 400, param=param)
    try:
        raw = base64.b64decode(m.group(3), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(f"Expected base64 image bytes in the data: URI, found text that does not decode ({exc}).",
                       400, param=param) from None
    image_mod = require("PIL.Image", extra="serve", purpose="Images in chat requests to a VLM bundle")
    try:
        with image_mod.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ApiError(f"Expected an image of at most {MAX_IMAGE_PIXELS} pixels, found {im.width}×{im.height}. "
                               "Send a smaller image.", 400, param=param)
            rgb: Any = im.convert("RGB")
    except ApiError:
        raise
    except Exception as exc:  # Pillow's UnidentifiedImageError, OSError, DecompressionBombError
        raise ApiError(f"Expected a PNG, JPEG or other image Pillow reads in the data: URI, found bytes it cannot "
                       f"decode ({type(exc).__name__}). Send a valid image file's bytes.", 400, param=param) from None
    height, width = size
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), image_mod.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)

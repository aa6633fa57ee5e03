"""Small image conversions shared by the ingest adapters and the search command."""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_grey"]


def to_grey(img: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 greyscale, transparent areas composited onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("L"))

"""Real photographs that exist offline, for accuracy checks on real inputs.

Sources, in this order, each skipped when absent: scikit-image's bundled samples, matplotlib's
``grace_hopper.jpg``, scikit-learn's ``load_sample_images()`` (china, flower). Nothing is
downloaded: scikit-image samples that need ``pooch`` are not listed.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

# Bundled in scikit-image's wheel (gray ones become RGB); order: most "natural photo" first.
SKIMAGE_SAMPLES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "retina",
    "colorwheel",
)


def _rgb(array) -> Optional[np.ndarray]:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        return None
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        return None
    return np.ascontiguousarray(array[:, :, :3])


def _skimage() -> Iterator[Tuple[str, Callable]]:
    if importlib.util.find_spec("skimage") is None:
        return
    from skimage import data

    for name in SKIMAGE_SAMPLES:
        if hasattr(data, name):
            yield f"skimage.{name}", getattr(data, name)


def _grace_hopper() -> Iterator[Tuple[str, Callable]]:
    if importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("PIL") is None:
        return
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if os.path.isfile(path):

        def load():
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))

        yield "matplotlib.grace_hopper", load


def _sklearn() -> Iterator[Tuple[str, Callable]]:
    if importlib.util.find_spec("sklearn") is None:
        return
    from sklearn.datasets import load_sample_images

    try:
        bunch = load_sample_images()
    except Exception:  # files missing from the install
        return
    for fname, image in zip(bunch.filenames, bunch.images):
        yield f"sklearn.{os.path.splitext(os.path.basename(fname))[0]}", (lambda im=image: im)


def named_real_images(n: Optional[int] = None) -> List[Tuple[str, np.ndarray]]:
    """``[(name, HxWx3 uint8 RGB array), ...]``, at most ``n`` (all when None); the first few
    are astronaut, chelsea, coffee, rocket, camera (as scikit-image ships them)."""
    out = []
    for source in (_skimage, _grace_hopper, _sklearn):
        for name, load in source():
            if n is not None and len(out) >= n:
                return out
            try:
                image = _rgb(load())
            except Exception:  # a sample that needs a download, or an unreadable file
                image = None
            if image is not None:
                out.append((name, image))
    return out


def real_images(n: Optional[int] = None) -> List[np.ndarray]:
    """Up to ``n`` real RGB uint8 images (fewer if fewer exist here); see
    :func:`named_real_images`."""
    return [image for _, image in named_real_images(n)]

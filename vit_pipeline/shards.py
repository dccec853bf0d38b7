"""Image folders of any size: decoded once into ``.npy`` shards, read back a piece at a time.

An image folder is listed (paths and labels only), split on the file list, and
each split is decoded into shards of ``SHARD_IMAGES`` images, written one after
the other: ``prepare`` never holds more than one shard of decoded images (plus
the images in flight in the decoding threads). ``ShardedImages`` is the split as
an array-like: ``len``, ``shape``, slices and index arrays read only the shards
they touch, so evaluation, the parity gate, int8 calibration and the benchmark
use it like a numpy array. Training streams it with ``tf.data`` (``dataset``):
shard order and the images inside each shard are shuffled anew each epoch, with
a shuffle buffer of one shard on top, so peak memory is about three shards
(the one read, the buffer, the batches in flight) whatever the folder's size.

Shards hold uint8 ``(n, size, size, 3)`` arrays (``np.save``, no pickles).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline.fsutil import atomic_path
from vit_pipeline.progress import quiet

log = logging.getLogger(__name__)

SHARD_IMAGES = 2048  # 25 MiB per shard at 64x64, 6 MiB at 32x32
MANIFEST = "shards.json"


def decode_image(path: Path, size: int) -> np.ndarray | None:
    """One file as uint8 RGB ``size`` x ``size`` (bilinear), or None if it is not a readable image."""
    from PIL import Image
    from vit_consumer import contract
    from vit_consumer.classifier import to_rgb  # as the service reads an image: upright, 16 bits scaled

    try:
        with Image.open(path, formats=contract.IMAGE_FORMATS) as img:  # the formats the service reads too
            return np.asarray(to_rgb(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except MemoryError:
        raise
    except (
        Exception
    ) as exc:  # Pillow's decoders raise SyntaxError, struct.error, IndexError... on damaged files
        log.warning("Skipping unreadable image %s: %s", path, " ".join(str(exc).split())[:200])
        return None


class ShardedImages:
    """One split's images in ``.npy`` shards, indexable like a uint8 ``(N, H, W, 3)`` array."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, paths: list[Path], counts: list[int], image_shape: tuple[int, int, int]):
        self.paths = [Path(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), *image_shape)
        self._cached: tuple[int, np.ndarray] | None = None  # the last shard read (sequential slices)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedImages(shape={self.shape}, shards={len(self.paths)})"

    def load(self, i: int) -> np.ndarray:
        """Shard ``i`` read from disk (no pickles)."""
        return np.load(self.paths[i], allow_pickle=False)

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` in memory (the last one read is kept for the next slice)."""
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, self.load(i))
        return self._cached[1]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, stop)
        if isinstance(index, int | np.integer):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {index} is out of bounds for {len(self)} images")
            return self._range(i, i + 1)[0]
        rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + len(self), rows).astype(np.int64)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):  # each shard read once, whatever the order of the rows
            picked = which == s
            out[picked] = self.shard(int(s))[rows[picked] - self.offsets[s]]
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.shape[1:]), np.uint8)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        last = int(np.searchsorted(self.offsets, stop - 1, side="right") - 1)
        parts = [self.shard(s)[max(start - self.offsets[s], 0) : stop - self.offsets[s]]
                 for s in range(first, last + 1)]  # fmt: skip
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # Everything at once: what this class exists to avoid; kept for small folders and tests.
        out = self._range(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def iter_shards(self) -> Iterator[np.ndarray]:
        for i in range(len(self.paths)):
            yield self.load(i)

    def to_manifest(self, base: Path) -> dict[str, Any]:
        return {"shards": [str(p.relative_to(base)) for p in self.paths], "counts": self.counts,
                "image_shape": list(self.shape[1:])}  # fmt: skip

    @classmethod
    def from_manifest(cls, doc: dict[str, Any], base: Path) -> ShardedImages:
        return cls([base / p for p in doc["shards"]], doc["counts"], tuple(doc["image_shape"]))


def update_digest(h: Any, images: np.ndarray | ShardedImages) -> None:
    """Shape and bytes of an image array into ``h``: the same for an array and its shards."""
    h.update(str(images.shape).encode())
    update_bytes(h, images)


def update_bytes(h: Any, images: np.ndarray | ShardedImages) -> None:
    """Feeds the image bytes alone to ``h`` (the same for an array and its shards), shard by shard."""
    for part in images.iter_shards() if isinstance(images, ShardedImages) else [images]:
        h.update(np.ascontiguousarray(part).tobytes())


def write_shards(
    files: list[Path],
    labels: np.ndarray,
    out_dir: Path,
    split: str,
    size: int,
    shard_images: int = SHARD_IMAGES,
    workers: int | None = None,
    shown: Any = None,
) -> tuple[ShardedImages, np.ndarray, int]:
    """Decodes ``files`` in order into shards ``out_dir/<split>-NNNNN.npy``.

    Unreadable files are skipped (counted and logged). Memory: one shard of
    decoded images plus the decoding threads' current files.

    Returns:
        ``(images, labels of the images kept, number skipped)``.
    """

    shown = shown or quiet()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, counts, kept, skipped = [], [], [], 0
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        for start in range(0, len(files), shard_images):
            chunk = files[start : start + shard_images]
            decoded = list(pool.map(lambda f: decode_image(f, size), chunk))
            good = [i for i, img in enumerate(decoded) if img is not None]
            skipped += len(chunk) - len(good)
            shown.advance(len(chunk))
            if not good:
                continue
            path = out_dir / f"{split}-{len(paths):05d}.npy"
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.stack([decoded[i] for i in good]), allow_pickle=False)
            paths.append(path)
            counts.append(len(good))
            kept.append(labels[start : start + shard_images][good])
            del decoded
    y = np.concatenate(kept).astype(np.int32) if kept else np.empty((0,), np.int32)
    return ShardedImages(paths, counts, (size, size, 3)), y, skipped


def dataset(images: ShardedImages, labels: np.ndarray, seed: int, shuffle: bool):
    """``tf.data`` of ``(image, label)`` read shard by shard (shuffled anew each epoch if asked)."""
    import tensorflow as tf

    epoch = [0]

    def shards():
        rng = np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        order = rng.permutation(len(images.paths)) if shuffle else range(len(images.paths))
        for s in order:
            x = images.load(s)
            y = labels[images.offsets[s] : images.offsets[s + 1]]
            if shuffle:
                perm = rng.permutation(len(x))
                x, y = x[perm], y[perm]
            yield x, y

    spec = (tf.TensorSpec((None, *images.shape[1:]), tf.uint8), tf.TensorSpec((None,), tf.int32))
    # The size is known: saying so lets Keras count steps (and not warn at the first epoch's end).
    ds = tf.data.Dataset.from_generator(shards, output_signature=spec).unbatch()
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(images)))
    if shuffle:
        ds = ds.shuffle(max(images.counts, default=1), seed=seed, reshuffle_each_iteration=True)
    return ds

"""The data-validation stage (after prepare): statistics, schema, anomalies, drift and leakage.

TFX's StatisticsGen, SchemaGen and ExampleValidator, for image datasets:

* **Statistics** of each split (``DatasetStatistics``): image count, per-class counts, image
  shape, per-channel pixel mean, std and 32-bin histogram, constant images (one value
  everywhere, e.g. an all-black frame); for image folders also the source files' sizes and
  modes (read from the headers). Logged as ``data/statistics.json`` and a histogram plot.
* **Schema** (``Schema``): what a dataset is expected to look like, inferred from the first
  run of a dataset name and stored at ``$VIT_PIPELINE_HOME/schemas/<dataset>.json`` (or
  ``schema_path``), a JSON file the user may edit: the class list, the image shape, a minimum
  image count per class and split (``min_class_fraction`` of the count it was inferred from),
  the largest number of constant images, the source image modes. Every run logs the schema it
  was checked against.
* **Anomalies** (class list changed, a class under its minimum, too many constant images, a
  wrong shape, a new image mode; and, from the first run on, images that appear under two or more
  classes, ``max_conflicting_images``) fail the stage with one line naming each.
* **Drift** against the champion's training statistics, recorded on every run: the
  Jensen-Shannon distance (``scipy.spatial.distance.jensenshannon``, base 2, in [0, 1]) of
  each channel's histogram and the L-infinity distance of the class distributions. Above
  ``drift_channel_threshold`` / ``drift_class_threshold`` the registry does not promote (when
  ``drift_blocks_promotion``), and the reason says so.
* **Leakage**: exact (identical pixels) and near duplicates (perceptual hash) between the
  training/validation images and the test images, counted and listed; ``drop_leaked_test``
  removes them from the test split before evaluation. Perceptual hashes come from
  ``ImageHash`` (maintained since 2013, the DCT hash of Zauner 2010 that duplicate finders
  use): a test image is a near duplicate when its 64-bit pHash is within
  ``leakage_max_distance`` bits of a training image's, which catches renamed, re-encoded and
  lightly resized copies that byte hashes miss.
* **Lineage leakage** (a run with ``init_from``): a fine-tuned model has also seen what its
  checkpoint trained on. Every run logs the hashes of the images its weights were trained on,
  its own training split and its checkpoint's (``data/seen_images.npz``, so a chain of
  fine-tunings carries them all); a run that starts from a model of this project checks its
  test and validation images against those of its checkpoint. Test images the checkpoint trained
  on (exact or near copies) count as leaked and, unless ``drop_leaked_test`` drops them, keep the
  version from becoming champion (``init_leakage_blocks_promotion``); validation images it trained on
  flatter the best-epoch choice and are counted. An image that also copies one of this run's own
  training (or, for a test image, validation) images is not counted against the checkpoint: a model
  trained from scratch on this split has the same copy, and the leakage check reports it (the
  lineage outcome gives the number of such test images). The same folder split again with another
  ``seed`` or ``test_split`` is the usual way this happens. A Keras-Hub or Hugging Face
  checkpoint does not record its training images: the check says so.

Outcomes are run tags (``gate.data_validation``, ``gate.drift``, ``gate.leakage``,
``gate.lineage``) that the register stage copies to the model version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline.errors import DataError
from vit_pipeline.fsutil import scratch_root, write_text

if TYPE_CHECKING:
    from vit_pipeline.config import PipelineConfig
    from vit_pipeline.context import StageContext
    from vit_pipeline.data import Splits

log = logging.getLogger(__name__)

BINS = 32  # histogram bins over 0..255 per channel
SPLITS = ("train", "val", "test")
CHUNK = 1024  # images read at a time (a sharded split is never loaded whole)
STATISTICS_ARTIFACT = "data/statistics.json"


class DataValidationError(DataError):
    """The data broke its schema; the message names every anomaly."""


# ------------------------------------------------------------------ statistics
@dataclass
class SplitStatistics:
    """One split's figures (pixel values 0-255)."""

    count: int
    class_counts: dict[str, int]
    image_shape: list[int]
    channel_mean: list[float]
    channel_std: list[float]
    channel_histograms: list[list[float]]  # per channel, BINS shares summing to 1
    constant_images: int
    constant_examples: list[int] = field(default_factory=list)  # indices of the first few


@dataclass
class DatasetStatistics:
    dataset: str
    class_names: list[str]
    splits: dict[str, SplitStatistics]
    source_files: dict[str, Any] = field(default_factory=dict)  # image folders: sizes and modes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DatasetStatistics:
        splits = {k: SplitStatistics(**v) for k, v in raw["splits"].items()}
        return cls(raw["dataset"], list(raw["class_names"]), splits, dict(raw.get("source_files") or {}))

    def class_distribution(self, split: str = "train") -> dict[str, float]:
        counts = self.splits[split].class_counts
        total = max(1, sum(counts.values()))
        return {name: n / total for name, n in counts.items()}


def split_statistics(images, labels: np.ndarray, class_names: list[str]) -> SplitStatistics:
    """Counts, channel moments and histograms of one split, read ``CHUNK`` images at a time."""
    n = len(labels)
    hist = np.zeros((3, BINS), np.int64)
    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    constant: list[int] = []
    for start in range(0, n, CHUNK):
        x = np.asarray(images[start : start + CHUNK])
        flat = x.reshape(len(x), -1, 3).astype(np.float64)
        total += flat.sum(axis=(0, 1))
        total_sq += (flat**2).sum(axis=(0, 1))
        for c in range(3):
            hist[c] += np.bincount(x[..., c].ravel() // (256 // BINS), minlength=BINS)
        per_image = x.reshape(len(x), -1)
        same = per_image.min(axis=1) == per_image.max(axis=1)
        constant += (np.flatnonzero(same) + start).tolist()
    pixels = max(1, n * int(np.prod(images.shape[1:3])))
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 0.0))
    counts = np.bincount(labels, minlength=len(class_names))
    return SplitStatistics(
        count=int(n),
        class_counts={name: int(counts[i]) for i, name in enumerate(class_names)},
        image_shape=[int(s) for s in images.shape[1:]],
        channel_mean=[round(float(v), 4) for v in mean],
        channel_std=[round(float(v), 4) for v in std],
        channel_histograms=[(h / max(1, h.sum())).round(6).tolist() for h in hist],
        constant_images=len(constant),
        constant_examples=constant[:20],
    )


def source_file_statistics(root: str | Path) -> dict[str, Any]:
    """Sizes and modes of an image folder's files, from their headers (PIL opens lazily)."""
    from collections import Counter

    from PIL import Image
    from vit_consumer import contract

    from vit_pipeline.data import image_folder_layout, list_splits

    listed, _ = list_splits(image_folder_layout(Path(root)))
    sizes: Counter = Counter()
    modes: Counter = Counter()
    unreadable = 0
    for files, _labels in listed.values():
        for f in files:
            try:
                with Image.open(f, formats=contract.IMAGE_FORMATS) as img:  # what prepare reads, no more
                    sizes[f"{img.width}x{img.height}"] += 1
                    modes[img.mode] += 1
            except Exception:  # counted; prepare already skipped (and logged) the same files
                unreadable += 1
    widths = [int(s.split("x")[0]) for s in sizes.elements()] or [0]
    heights = [int(s.split("x")[1]) for s in sizes.elements()] or [0]
    return {"files": sum(sizes.values()) + unreadable, "unreadable": unreadable, "modes": dict(modes),
            "sizes_top": dict(sizes.most_common(10)), "min_side": min(min(widths), min(heights)),
            "median_width": float(np.median(widths)), "median_height": float(np.median(heights))}  # fmt: skip


def statistics(splits: Splits, dataset: str, folder: str | None = None) -> DatasetStatistics:
    """Statistics of every split (and, for an image folder, of its source files)."""
    parts = {
        "train": split_statistics(splits.x_train, splits.y_train, splits.class_names),
        "val": split_statistics(splits.x_val, splits.y_val, splits.class_names),
        "test": split_statistics(splits.x_test, splits.y_test, splits.class_names),
    }
    return DatasetStatistics(dataset, list(splits.class_names), parts,
                             source_file_statistics(folder) if folder else {})  # fmt: skip


# ---------------------------------------------------------------------- schema
@dataclass
class Schema:
    """What a dataset must look like (a JSON file the user may edit)."""

    dataset: str
    class_names: list[str]
    image_shape: list[int]
    min_class_images: dict[str, dict[str, int]]  # split -> class -> minimum count
    max_constant_images: dict[str, int]  # split -> largest number of constant images
    source_modes: list[str] | None = None  # image folders: the PIL modes allowed
    inferred_from_run: str = ""

    @classmethod
    def infer(cls, stats: DatasetStatistics, min_class_fraction: float, run_id: str) -> Schema:
        mins = {
            split: {name: int(np.floor(min_class_fraction * n)) for name, n in s.class_counts.items()}
            for split, s in stats.splits.items()
        }
        modes = sorted(stats.source_files.get("modes", {})) or None
        return cls(stats.dataset, list(stats.class_names), list(stats.splits["train"].image_shape), mins,
                   {split: s.constant_images for split, s in stats.splits.items()}, modes, run_id)  # fmt: skip

    @classmethod
    def read(cls, path: str | Path) -> Schema:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"Expected a data schema (JSON) at {path}. Received: {exc}") from None

    def write(self, path: str | Path) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_text(path, json.dumps(asdict(self), indent=1))


def schema_path(cfg: PipelineConfig) -> Path:
    from vit_pipeline.tracking import home

    return Path(cfg.schema_path) if cfg.schema_path else home() / "schemas" / f"{cfg.dataset_tag}.json"


def anomalies(stats: DatasetStatistics, schema: Schema) -> list[str]:
    """Each way ``stats`` breaks ``schema``, in words (empty: none)."""
    found: list[str] = []
    if stats.class_names != schema.class_names:
        missing = [c for c in schema.class_names if c not in stats.class_names]
        extra = [c for c in stats.class_names if c not in schema.class_names]
        what = (
            f"missing {missing[:10]}, new {extra[:10]}" if missing or extra else "same classes, other order"
        )
        found.append(
            f"class list changed ({what}; if this is another dataset, give it its own --dataset-name)"
        )
    for split, s in stats.splits.items():
        if s.image_shape != schema.image_shape:
            found.append(f"{split} images are {s.image_shape}, schema {schema.image_shape}")
        under = [(name, n, schema.min_class_images.get(split, {}).get(name, 0))
                 for name, n in s.class_counts.items()]  # fmt: skip
        under = [u for u in under if u[1] < u[2]]
        if under:
            shown = ", ".join(f"{name!r} has {n} (minimum {m})" for name, n, m in under[:5])
            found.append(f"{len(under)} classes under their minimum in {split}: {shown}")
        limit = schema.max_constant_images.get(split, 0)
        if s.constant_images > limit:
            found.append(f"{s.constant_images} constant images in {split} (at most {limit}; e.g. index "
                         f"{s.constant_examples[:3]})")  # fmt: skip
    modes = set(stats.source_files.get("modes", {}))
    if schema.source_modes is not None and modes - set(schema.source_modes):
        found.append(
            f"new image modes {sorted(modes - set(schema.source_modes))} (schema {schema.source_modes})"
        )
    return found


# ----------------------------------------------------------------------- drift
@dataclass
class Drift:
    """This run's training data against the champion's."""

    computed: bool
    reason: str = ""
    channel_js: list[float] = field(default_factory=list)  # R, G, B
    class_linf: float | None = None
    channel_threshold: float = 0.0
    class_threshold: float = 0.0
    against_run: str | None = None

    @property
    def above(self) -> bool:
        return bool(self.over)

    @property
    def over(self) -> list[str]:
        """The measures above their thresholds."""
        if not self.computed:
            return []
        measures = (("channel JS", max(self.channel_js), self.channel_threshold),
                    ("class L-inf", self.class_linf or 0, self.class_threshold))  # fmt: skip
        return [name for name, value, limit in measures if value > limit]

    @property
    def outcome(self) -> str:
        if not self.computed:
            return f"not computed: {self.reason}"
        figures = f"channel JS max {max(self.channel_js):.4f}, class L-inf {self.class_linf:.4f}"
        limits = f"thresholds {self.channel_threshold:g} / {self.class_threshold:g}"
        over = self.over
        tripped = f"; over: {', '.join(over)}" if over else ""
        return f"{'above' if over else 'within'}: {figures} ({limits}{tripped})"


def drift(current: DatasetStatistics, reference: DatasetStatistics, channel_threshold: float,
          class_threshold: float, against_run: str | None = None) -> Drift:  # fmt: skip
    """Jensen-Shannon distance of each channel histogram, L-infinity of the class distributions."""
    from scipy.spatial.distance import jensenshannon

    a, b = current.splits["train"], reference.splits["train"]
    js = [float(jensenshannon(np.asarray(p), np.asarray(q), base=2)) for p, q in
          zip(a.channel_histograms, b.channel_histograms, strict=True)]  # fmt: skip
    p, q = current.class_distribution(), reference.class_distribution()
    linf = max(abs(p.get(name, 0.0) - q.get(name, 0.0)) for name in set(p) | set(q))
    return Drift(True, "", [round(v, 6) for v in js], round(float(linf), 6), channel_threshold, class_threshold,
                 against_run)  # fmt: skip


def champion_statistics(cfg: PipelineConfig) -> tuple[DatasetStatistics | None, str, str | None]:
    """The champion's training statistics: (statistics, why not, its run id)."""
    from vit_pipeline import tracking
    from vit_pipeline.errors import TrackingUnavailable
    from vit_pipeline.registry import current_champion

    client = tracking.client(cfg)
    champion = current_champion(client, cfg.resolved_model_name)
    if champion is None:
        return None, f"no champion of {cfg.resolved_model_name!r} yet", None
    if champion.tags.get("dataset") != cfg.dataset_tag:
        return None, f"the champion was trained on {champion.tags.get('dataset')!r}", champion.run_id

    def outage(exc: BaseException) -> Exception:  # "not computed" would let a blocking drift gate pass
        return TrackingUnavailable(
            f"Could not download the champion's {STATISTICS_ARTIFACT} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); drift was not computed: --resume once the store answers"
        )

    def read(path: Path) -> DatasetStatistics:
        return DatasetStatistics.from_dict(json.loads(path.read_text()))

    stats, why = tracking.read_run_file(cfg, champion.run_id, STATISTICS_ARTIFACT, read, outage)
    if stats is None:  # an older champion without statistics, or an unreadable file
        return (
            None,
            f"the champion's run{why.removeprefix('its run')}",
            None,
        )  # "...'s data/statistics.json ..."
    return stats, "", champion.run_id


# --------------------------------------------------------------------- leakage
SEEN_ARTIFACT = "data/seen_images.npz"  # hashes of every image the run's weights were trained on


@dataclass(frozen=True)
class ImageHashes:
    """Perceptual and exact hashes of a set of images: what leakage checks compare.

    Attributes:
        phash: (n,) uint64, each image's 64-bit DCT perceptual hash (``imagehash.phash``).
        exact: (n, 16) uint8, each image's BLAKE2b-128 digest of its pixels.
    """

    phash: np.ndarray
    exact: np.ndarray
    complete: bool = True  # False: some ancestor's training images are unknown (not in these hashes)

    @classmethod
    def of(cls, images) -> ImageHashes:
        """Hashes of ``images`` (an array or a sharded split, ``CHUNK`` images read at a time)."""
        exact = np.frombuffer(b"".join(byte_hashes(images)), np.uint8).reshape(-1, 16)
        return cls(perceptual_hashes(images), exact)

    @classmethod
    def concat(cls, *parts: ImageHashes) -> ImageHashes:
        """One set of every part's images, each distinct image (by its pixel digest) once."""
        exact = np.concatenate([p.exact for p in parts]) if parts else np.empty((0, 16), np.uint8)
        phash = np.concatenate([p.phash for p in parts]) if parts else np.empty(0, np.uint64)
        _, first = np.unique(exact, axis=0, return_index=True)
        keep = np.sort(first)
        return cls(phash[keep], exact[keep], all(p.complete for p in parts))

    def __len__(self) -> int:
        return len(self.phash)

    def digests(self) -> list[bytes]:
        return [row.tobytes() for row in self.exact]

    def save(self, path: str | Path) -> Path:
        """Plain arrays in an ``.npz`` (no pickled objects: the file is read back from other runs)."""
        from vit_pipeline.fsutil import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, phash=self.phash, exact=self.exact, complete=np.array(self.complete))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ImageHashes:
        """Reads :meth:`save`'s file; any other file raises ``DataError`` in one line (nothing is unpickled)."""
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise TypeError("not an .npz archive")
                phash, exact, complete = z["phash"], z["exact"], z["complete"]
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise DataError(
                f"Could not read image hashes from {path}: {type(exc).__name__}: {reason}"
            ) from None
        if (phash.dtype != np.uint64 or phash.ndim != 1 or exact.dtype != np.uint8
                or exact.shape != (len(phash), 16) or complete.dtype != bool or complete.shape != ()):  # fmt: skip
            raise DataError(
                f"Expected image hashes phash (n,) uint64, exact (n, 16) uint8 and complete () bool. Received: "
                f"phash {phash.shape} {phash.dtype}, exact {exact.shape} {exact.dtype}, complete "
                f"{complete.shape} {complete.dtype} in {path}"
            )
        return cls(phash, exact, bool(complete))


@dataclass
class Leakage:
    """Test images that also appear (exactly or nearly) among the training/validation images.

    Images the ``init_from`` checkpoint trained on count too (``split`` "checkpoint" in ``pairs``).
    """

    max_distance: int
    exact: int
    near: int
    pairs: list[dict[str, Any]]  # test index, split and index of its closest copy, distance
    dropped: int = 0

    @property
    def leaked(self) -> int:
        return self.exact + self.near

    @property
    def from_checkpoint(self) -> int:
        return sum(p["split"] == "checkpoint" for p in self.pairs)

    @property
    def outcome(self) -> str:
        dropped = f", {self.dropped} dropped from the test split" if self.dropped else ""
        ckpt = (
            f" ({self.from_checkpoint} of them images the checkpoint trained on)"
            if self.from_checkpoint
            else ""
        )
        return (f"{self.exact} exact and {self.near} near duplicates of training or validation images in the test "
                "split"
                f"{ckpt}{dropped}")  # fmt: skip


@dataclass
class Lineage:
    """This run's test and validation images that its ``init_from`` checkpoint (or its ancestors) trained on."""

    checked: bool  # the checkpoint's training images (some or all of them) are known
    source: str = ""  # the pinned checkpoint
    seen: int = 0  # images the checkpoint's weights were trained on, as far as they are known
    test: int = 0  # ... that only the checkpoint trained on (not copies of this run's own train/val images)
    val: int = 0
    test_own: int = 0  # ... that copy this run's own images too (gate.leakage's finding)
    dropped: bool = False  # the test images among them were dropped (drop_leaked_test)
    why: str = ""  # why they are not (all) known

    @property
    def outcome(self) -> str:
        """``leaked: ...`` while test images the checkpoint trained on are evaluated on (blocks promotion)."""
        if not self.checked:
            return f"not checked: {self.why}"
        found = (f"{self.test} test and {self.val} validation images are exact or near copies of the {self.seen} "
                 f"images {self.source} was trained on")  # fmt: skip
        if self.why:
            found += f" that are recorded ({self.why})"
        if self.test_own:
            found += (f"; {self.test_own} more copy this run's own training or validation images too "
                      "(gate.leakage)")  # fmt: skip
        if self.test and not self.dropped:
            return f"leaked: {found}"
        dropped = " (those test images were dropped)" if self.test else ""
        return f"{'partly checked' if self.why else 'passed'}: {found}{dropped}"


def perceptual_hashes(images) -> np.ndarray:
    """64-bit pHash of every image (uint64), ``CHUNK`` images read at a time."""
    import imagehash
    from PIL import Image

    out = np.empty(len(images), np.uint64)
    for start in range(0, len(images), CHUNK):
        for i, img in enumerate(np.asarray(images[start : start + CHUNK]), start):
            bits = imagehash.phash(Image.fromarray(img)).hash.ravel()
            out[i] = np.packbits(bits).view(">u8")[0]
    return out


def byte_hashes(images) -> list[bytes]:
    out: list[bytes] = []
    for start in range(0, len(images), CHUNK):
        out += [hashlib.blake2b(img.tobytes(), digest_size=16).digest()
                for img in np.asarray(images[start : start + CHUNK])]  # fmt: skip
    return out


def copies(query: ImageHashes, references: dict[str, ImageHashes], max_distance: int) -> list[dict[str, Any]]:
    """Each query image with an exact copy (same pixels) or a near one (pHash within ``max_distance``).

    Returns:
        One pair per such image: its ``test_index``, the ``split`` and ``index`` of the copy (an
        exact copy first, else the closest), the ``distance`` in bits and the ``kind``.
    """
    refs = [(name, h) for name, h in references.items() if len(h)]
    if not refs or not len(query):
        return []
    ref_hash = np.concatenate([h.phash for _, h in refs])
    ref_where = [(name, i) for name, h in refs for i in range(len(h))]
    ref_bytes: dict[bytes, tuple[str, int]] = {}
    for where, b in zip(ref_where, (b for _, h in refs for b in h.digests()), strict=True):
        ref_bytes.setdefault(b, where)  # the first split named keeps an image found in two
    query_bytes = query.digests()
    pairs: list[dict[str, Any]] = []
    for start in range(0, len(query), 256):  # (256, N) distances at a time
        dist = np.bitwise_count(query.phash[start : start + 256, None] ^ ref_hash[None, :])
        closest = dist.argmin(axis=1)
        for row, j in enumerate(closest):
            i = start + row
            d = int(dist[row, j])
            if query_bytes[i] in ref_bytes:
                split, index = ref_bytes[query_bytes[i]]
                pairs.append(
                    {"test_index": i, "split": split, "index": index, "distance": 0, "kind": "exact"}
                )
            elif d <= max_distance:
                split, index = ref_where[int(j)]
                pairs.append({"test_index": i, "split": split, "index": index, "distance": d, "kind": "near"})
    return pairs


@dataclass(frozen=True)
class Conflicts:
    """Images with identical pixels under two or more labels: how many (files), by class group, with examples."""

    images: int
    groups: dict[tuple[str, ...], int]  # class names -> images
    examples: dict[tuple[str, ...], str]  # class names -> "split index" of one of them

    def summary(self) -> str:
        shown = ", ".join(f"{' / '.join(map(repr, names))}: {n} (e.g. {self.examples[names]})"
                          for names, n in sorted(self.groups.items(), key=lambda g: -g[1])[:5])  # fmt: skip
        return f"{self.images} images appear under two or more classes with identical pixels ({shown})"


def conflicting_labels(splits: Splits, hashes: list[ImageHashes]) -> Conflicts:
    """The images that carry two or more labels (identical pixels, any split). Constant images (blank frames)
    are left to their own check (``max_constant_images``): they are the same everywhere by nature."""
    parts = list(zip(("train", "val", "test"), (splits.x_train, splits.x_val, splits.x_test), hashes,
                     (splits.y_train, splits.y_val, splits.y_test), strict=True))  # fmt: skip
    labels: dict[bytes, set[int]] = {}
    count: dict[bytes, int] = {}
    where: dict[bytes, tuple[str, int]] = {}
    for name, _, part, y in parts:
        for i, (digest, label) in enumerate(zip(part.digests(), np.asarray(y), strict=True)):
            labels.setdefault(digest, set()).add(int(label))
            count[digest] = count.get(digest, 0) + 1
            where.setdefault(digest, (name, i))
    images = {name: x for name, x, _, _ in parts}
    groups: dict[tuple[str, ...], int] = {}
    examples: dict[tuple[str, ...], str] = {}
    for digest, found in labels.items():
        if len(found) < 2:
            continue
        split, i = where[digest]
        one = np.asarray(images[split][i])
        if one.min() == one.max():  # a blank frame: max_constant_images decides
            continue
        names = tuple(splits.class_names[k] for k in sorted(found))
        groups[names] = groups.get(names, 0) + count[digest]
        examples.setdefault(names, f"{split} image {i}")
    return Conflicts(sum(groups.values()), groups, examples)


def leakage(test: ImageHashes, references: dict[str, ImageHashes], max_distance: int) -> Leakage:
    """Each test image's copy among the reference splits (train, val and the checkpoint's training images)."""
    pairs = copies(test, references, max_distance)
    exact = sum(p["kind"] == "exact" for p in pairs)
    return Leakage(max_distance, exact, len(pairs) - exact, pairs)


def _seen_by_checkpoint(query: ImageHashes, seen: ImageHashes, own: dict[str, ImageHashes],
                        max_distance: int) -> tuple[int, int]:  # fmt: skip
    """(images the checkpoint trained on that this run's own splits do not hold, those they hold too).

    A copy of one of this run's own training images is the leakage gate's finding, whatever the
    checkpoint saw: a model trained from scratch on this split has it too. The lineage gate counts
    what only the checkpoint brings (the same folder split again with another seed).
    """
    mine = {p["test_index"] for p in copies(query, own, max_distance)}
    theirs = {p["test_index"] for p in copies(query, {"checkpoint": seen}, max_distance)}
    return len(theirs - mine), len(theirs & mine)


def checkpoint_seen(cfg: PipelineConfig) -> tuple[ImageHashes | None, Lineage]:
    """The images ``cfg.init_from`` was trained on (its run's ``SEEN_ARTIFACT``), or why they are unknown.

    Raises:
        DataError: the run has the file, but it cannot be read (the check fails closed: a store that
            does not answer or a damaged file stops the run instead of passing it unchecked).
    """

    import mlflow
    from vit_consumer.mlflow_store import store_uris

    from vit_pipeline import finetune, tracking

    source = finetune.resolve(cfg.init_from, cfg.tracking.tracking_uri)
    if source.run_id is None:
        why = f"{source.uri} is not a model logged by this project, so its training images are not recorded"
        return None, Lineage(False, source.uri, why=why)
    client = tracking.client(cfg)
    folder, _, _ = SEEN_ARTIFACT.rpartition("/")
    if SEEN_ARTIFACT not in {a.path for a in client.list_artifacts(source.run_id, folder)}:
        why = f"run {source.run_id} of {source.uri} has no {SEEN_ARTIFACT} (logged by an earlier version)"
        return None, Lineage(False, source.uri, why=why)
    with (
        tempfile.TemporaryDirectory(prefix="vit-seen-", dir=scratch_root()) as tmp,
        store_uris(tracking.tracking_uri(cfg)),
    ):
        path = mlflow.artifacts.download_artifacts(run_id=source.run_id, artifact_path=SEEN_ARTIFACT,
                                                   dst_path=tmp)  # fmt: skip
        seen = ImageHashes.load(path)
    if not seen.complete:  # its own checkpoint's images were unknown: a passed check would claim too much
        why = f"the training images of an ancestor of {source.uri} are not recorded"
        return seen, Lineage(True, source.uri, seen=len(seen), why=why)
    return seen, Lineage(True, source.uri, seen=len(seen))


def drop_test_images(splits: Splits, indices: list[int]) -> Splits:
    """The splits without those test images (the rest of the test split read into memory)."""
    keep = np.setdiff1d(np.arange(len(splits.y_test)), np.asarray(indices, np.int64))
    if len(keep) == 0:
        raise DataError("Every test image is a duplicate of a training image; nothing is left to evaluate on")
    return replace(splits, x_test=np.asarray(splits.x_test[keep]), y_test=splits.y_test[keep], _digest=None)


# ------------------------------------------------------------------------ plots
def plot_histograms(stats: DatasetStatistics, reference: DatasetStatistics | None, path: Path) -> Path:
    """Channel histograms of each split, and of the champion's training data when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vit_pipeline.evaluate import _save_fig

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharey=True)
    centers = (np.arange(BINS) + 0.5) * (256 / BINS)
    for c, (ax, colour) in enumerate(zip(axes, ("red", "green", "blue"), strict=True)):
        for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
            ax.plot(centers, stats.splits[split].channel_histograms[c], style, label=split)
        if reference is not None:
            ax.plot(centers, reference.splits["train"].channel_histograms[c], "k-", alpha=0.4,
                    label="champion's train")  # fmt: skip
        ax.set_title(f"{colour} channel")
        ax.set_xlabel("pixel value")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of pixels")
    axes[0].legend()
    return _save_fig(fig, path)


def plot_leaks(splits: Splits, leaks: Leakage, path: Path, limit: int = 8) -> Path | None:
    """The first duplicate pairs side by side (test image above, its training copy below)."""
    if not leaks.pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vit_pipeline.evaluate import _save_fig

    shown = leaks.pairs[:limit]
    fig, axes = plt.subplots(2, len(shown), figsize=(1.6 * len(shown), 3.6), squeeze=False)
    source = {"train": splits.x_train, "val": splits.x_val}
    for k, pair in enumerate(shown):
        axes[0, k].imshow(splits.x_test[pair["test_index"]])
        axes[0, k].set_title(f"test {pair['test_index']}", fontsize=7)
        if pair["split"] in source:
            axes[1, k].imshow(source[pair["split"]][pair["index"]])
        else:  # only the hashes of the checkpoint's training images are kept
            axes[1, k].text(
                0.5, 0.5, "an image the\ncheckpoint\ntrained on", ha="center", va="center", fontsize=7
            )
        axes[1, k].set_title(f"{pair['split']} {pair['index']} (d={pair['distance']})", fontsize=7)
        for ax in axes[:, k]:
            ax.axis("off")
    return _save_fig(fig, path)


# ------------------------------------------------------------------- the stage
@dataclass
class DataValidation:
    """What the stage found (anomalies fail it before it returns)."""

    schema_path: str
    schema_created: bool
    drift: Drift
    leakage: Leakage
    data_path: str  # the prepared data to train on (rewritten when leaked test images were dropped)
    lineage: Lineage | None = None  # None: trained from random weights

    def tags(self) -> dict[str, str]:
        outcome = (
            f"passed: schema inferred from this run ({self.schema_path}): later runs are checked against it, "
            "this one only for images under two classes"
            if self.schema_created  # against a schema made of these statistics, nothing else could fail
            else f"passed: no anomalies against {self.schema_path}"
        )
        tags = {"gate.data_validation": outcome,
                "gate.drift": self.drift.outcome, "gate.leakage": self.leakage.outcome}  # fmt: skip
        if self.lineage is not None:
            tags["gate.lineage"] = self.lineage.outcome
        return tags


def run(ctx: StageContext, data_path: str) -> DataValidation:
    """Statistics, schema check (anomalies raise), drift, leakage; logs all of it to the run."""
    from vit_pipeline.data import Splits

    cfg = ctx.cfg
    out = ctx.work_dir / "data-validation"
    splits = Splits.load(data_path)
    folder = cfg.data_path if cfg.dataset == "image_folder" else None
    stats = statistics(splits, cfg.dataset_tag, folder)
    write_text(out / "statistics.json", json.dumps(stats.to_dict(), indent=1))
    path = schema_path(cfg)
    created = not path.exists()
    # The first run of a dataset name states what later runs must match, once its data has passed.
    schema = Schema.infer(stats, cfg.min_class_fraction, ctx.run_id) if created else Schema.read(path)
    write_text(out / "schema.json", json.dumps(asdict(schema), indent=1))
    found = anomalies(stats, schema)
    train, val, test = (ImageHashes.of(x) for x in (splits.x_train, splits.x_val, splits.x_test))
    conflicts = conflicting_labels(splits, [train, val, test])
    if conflicts.images > cfg.max_conflicting_images:
        found.append(f"{conflicts.summary()} (a folder copied under two names, or re-sorted? at most "
                     f"{cfg.max_conflicting_images}: --max-conflicting-images)")  # fmt: skip
    write_text(out / "anomalies.json", json.dumps(found, indent=1))
    ctx.log.artifacts([out / "statistics.json", out / "schema.json", out / "anomalies.json"], "data")
    ctx.log.metrics({"data.conflicting_images": conflicts.images})
    if found:
        ctx.log.tags({"gate.data_validation": f"failed: {'; '.join(found)}"[:5000]})
        raise DataValidationError(f"Data validation failed against {path}: {'; '.join(found)}")
    if created:
        schema.write(path)

    reference, why, champion_run = champion_statistics(cfg)
    drifted = (drift(stats, reference, cfg.drift_channel_threshold, cfg.drift_class_threshold, champion_run)
               if reference is not None else Drift(False, why, channel_threshold=cfg.drift_channel_threshold,
                                                   class_threshold=cfg.drift_class_threshold))  # fmt: skip
    seen_before, lineage = checkpoint_seen(cfg) if cfg.init_from else (None, None)
    refs = {"train": train, "val": val, **({"checkpoint": seen_before} if seen_before is not None else {})}
    leaks = leakage(test, refs, cfg.leakage_max_distance)
    if seen_before is not None:
        distance = cfg.leakage_max_distance
        lineage.test, lineage.test_own = _seen_by_checkpoint(
            test, seen_before, {"train": train, "val": val}, distance
        )
        lineage.val, _ = _seen_by_checkpoint(val, seen_before, {"train": train}, distance)
    # What this run's weights learn from, with what its checkpoint's learnt from (when that is known).
    trained_on = ImageHashes.concat(train, *([seen_before] if seen_before is not None else []))
    if lineage is not None and seen_before is None:  # a checkpoint whose training images are unknown
        trained_on = replace(trained_on, complete=False)
    trained_on.save(out / "seen_images.npz")
    plots = [plot_histograms(stats, reference, out / "channel_histograms.png"),
             plot_leaks(splits, leaks, out / "leaked_pairs.png")]  # fmt: skip
    if cfg.drop_leaked_test and leaks.leaked:
        splits = drop_test_images(splits, [p["test_index"] for p in leaks.pairs])
        leaks.dropped = leaks.leaked
        if lineage is not None:
            lineage.dropped = True
        data_path = str(splits.save(data_path))
    write_text(out / "drift.json", json.dumps(asdict(drifted) | {"outcome": drifted.outcome}, indent=1))
    write_text(out / "leakage.json", json.dumps(asdict(leaks) | {"outcome": leaks.outcome}, indent=1))
    ctx.log.artifacts([out / "drift.json", out / "leakage.json", out / "seen_images.npz",
                       *[p for p in plots if p]], "data")  # fmt: skip
    metrics = {"data.test_exact_duplicates": leaks.exact, "data.test_near_duplicates": leaks.near,
               "data.test_duplicates_dropped": leaks.dropped}  # fmt: skip
    if lineage is not None and lineage.checked:
        metrics |= {"data.test_seen_by_init": lineage.test, "data.val_seen_by_init": lineage.val}
    if drifted.computed:
        metrics |= {"drift.channel_js_max": max(drifted.channel_js), "drift.class_linf": drifted.class_linf}
    ctx.log.metrics(metrics)
    result = DataValidation(str(path), created, drifted, leaks, data_path, lineage)
    ctx.log.tags(result.tags())
    log.info("Data validation: %s", "; ".join(result.tags().values()))
    return result

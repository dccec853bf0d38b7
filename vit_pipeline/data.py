"""Data preparation: load a source, split it deterministically, validate, save.

Sources:
  * ``digits``: scikit-learn's 8x8 handwritten digits, upscaled to 32x32x3. Real
    images that ship with a dependency, so the quickstart needs no network.
  * ``cifar100``: the official ``cifar-100-python`` pickles, read from a local
    directory or ``.tar.gz`` (``data_path``), or downloaded once into Keras' cache
    (the same file and checksum as ``keras.datasets.cifar100``).
  * ``image_folder``: one sub-folder per class with PNG/JPEG files of any size
    and mode, converted to RGB and resized to ``input_size``; either
    ``ROOT/<class>/...`` or ``ROOT/{train,val|validation,test}/<class>/...``
    (given splits are used as they are, missing ones split off the training set).
    Folders are split on their file lists and decoded into ``.npy`` shards
    (``vit_pipeline.shards``), so a folder of any size fits in bounded memory.

Pickles are read with a restricted unpickler that can only rebuild numpy arrays,
so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from vit_pipeline.config import SPLIT_FOLDER_NAMES, PipelineConfig
from vit_pipeline.errors import DataError
from vit_pipeline.fsutil import atomic_path, scratch_dir
from vit_pipeline.shards import ShardedImages, update_digest, write_shards

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext

log = logging.getLogger(__name__)

CIFAR100_ORIGIN = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
# Same cache name and checksum as keras.datasets.cifar100, so both share one copy.
CIFAR100_CACHE_NAME = "cifar-100-python-target"
CIFAR100_SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
CIFAR100_MEMBERS = ("meta", "train", "test")
# What counts as an image in a folder (Keras' image_dataset_from_directory takes the first five), and the
# other names of JPEG and of formats Pillow reads.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                  ".jpe", ".jfif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}  # fmt: skip
# Folders that hold no classes: macOS' resource forks in zips, caches, the thumbnails and recycle bins NAS
# boxes (Synology, QNAP) and other systems write into shared folders (thumbnails of a class's photos in it would
# be counted as its images, copies of its test images among them).
IGNORED_FOLDERS = frozenset(name.casefold() for name in (  # compared case-blind: Windows writes $Recycle.Bin too
    "__MACOSX", "__pycache__", "@eaDir", "#recycle", "#snapshot", "@Recycle", "$RECYCLE.BIN",
    "System Volume Information", "lost+found"))  # fmt: skip

# The only globals a numpy array pickle needs (numpy 1.x and 2.x spellings).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def safe_unpickle(stream: BinaryIO, what: str) -> Any:
    """Loads a pickle that may only contain plain data and numpy arrays.

    Raises:
        DataError: if the pickle is corrupt or asks for any other global.
    """
    try:
        return RestrictedUnpickler(stream, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"Refusing to load {what}: {exc} (corrupt or malicious file)") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(f"Could not read {what}: corrupt pickle ({exc})") from exc


Images = np.ndarray | ShardedImages
IMAGE_KEYS = ("x_train", "x_val", "x_test")


@dataclass
class Splits:
    """A prepared dataset: uint8 images (N, H, W, 3), int32 labels, class names.

    Images are numpy arrays (digits, CIFAR-100) or ``ShardedImages`` (image
    folders), which index like arrays and read only the shards they touch.
    """

    x_train: Images
    y_train: np.ndarray
    x_val: Images
    y_val: np.ndarray
    x_test: Images
    y_test: np.ndarray
    class_names: list[str]
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False, compare=False)  # computed once, saved with it

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def digest(self) -> str:
        """SHA-256 over all images, labels and class names (content identity)."""
        if self._digest is None:  # a sharded split is read from disk to hash it: once
            h = hashlib.sha256()
            for arr in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
                update_digest(h, arr)
            h.update("\n".join(self.class_names).encode())
            self._digest = h.hexdigest()
        return self._digest

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "train_size": int(len(self.y_train)),
            "val_size": int(len(self.y_val)),
            "test_size": int(len(self.y_test)),
            "digest": self.digest(),
            **self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Saves to ``.npz`` atomically (no pickles inside); a sharded split as its shard list."""
        import json

        base = Path(path).parent
        images = {}
        for key in IMAGE_KEYS:
            x = getattr(self, key)
            if isinstance(x, ShardedImages):
                images[f"{key}_shards"] = np.array(json.dumps(x.to_manifest(base)))
            else:
                images[key] = x
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, **images, y_train=self.y_train, y_val=self.y_val, y_test=self.y_test,
                class_names=np.array(self.class_names, dtype=str), source=np.array(self.source),
                digest=np.array(self.digest()),
            )  # fmt: skip
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Splits:
        import json

        base = Path(path).parent
        with np.load(path, allow_pickle=False) as z:
            images = {
                key: ShardedImages.from_manifest(json.loads(str(z[f"{key}_shards"])), base)
                if f"{key}_shards" in z else z[key]
                for key in IMAGE_KEYS
            }  # fmt: skip
            return cls(
                **images,
                **{k: z[k] for k in ("y_train", "y_val", "y_test")},
                class_names=[str(c) for c in z["class_names"]],
                source=str(z["source"]),
                _digest=str(z["digest"]) if "digest" in z else None,  # files of earlier versions: recomputed
            )


# --------------------------------------------------------------------- sources
def load_digits_rgb() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits (1,797 images, 8x8, 0-16) as uint8 32x32x3 images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR)) for img in small]
    )
    x = np.repeat(big[..., None], 3, axis=-1)
    return x, digits.target.astype(np.int32), [str(i) for i in range(10)]


def fetch_cifar100() -> Path:
    """Downloads CIFAR-100 once into Keras' cache; returns the ``cifar-100-python`` dir."""
    import keras

    try:
        root = keras.utils.get_file(
            fname=CIFAR100_CACHE_NAME,
            origin=CIFAR100_ORIGIN,
            extract=True,
            file_hash=CIFAR100_SHA256,
        )
    except Exception as exc:  # network errors surface as many types
        raise DataError(
            f"Could not download CIFAR-100 from {CIFAR100_ORIGIN} ({exc}). Offline? "
            "Pass a local copy with --data-path /path/to/cifar-100-python[.tar.gz]"
        ) from exc
    return Path(root) / "cifar-100-python"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_batch(d: dict, what: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = {_text(k): v for k, v in d.items()} if isinstance(d, dict) else {}
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[label_key], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{what} has no {exc} entry; not a cifar-100-python batch") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(
            f"Expected {what} data of shape (N, 3072) and dtype uint8. "
            f"Received: shape={data.shape}, dtype={data.dtype}"
        )
    if len(labels) != len(data):
        raise DataError(f"{what} has {len(data)} images but {len(labels)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _archive_members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """The archive's cifar-100-python members by name; DataError if any is missing."""
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar.getmembers():
        name = m.name.split("/")[-1]
        if m.isfile() and name in CIFAR100_MEMBERS and name in members:  # which one is the data is unknown
            raise DataError(
                f"Archive {path} holds two {name} files ({members[name].name}, {m.name}); keep one"
            )
        if m.isfile():
            members[name] = m
    missing = [n for n in CIFAR100_MEMBERS if n not in members]
    if missing:
        raise DataError(
            f"Archive {path} lacks the cifar-100-python members {missing} (found: {sorted(members)[:10]})"
        )
    return members


def _cifar_dir(path: Path) -> Path:
    base = path / "cifar-100-python" if (path / "cifar-100-python").is_dir() else path
    for name in CIFAR100_MEMBERS:
        if not (base / name).is_file():
            raise DataError(f"Expected {base / name} in the cifar-100-python directory {path}")
    return base


def check_source(cfg: PipelineConfig, source_path: str | os.PathLike | None = None) -> None:
    """What can be checked before any work starts, without decoding: paths, archive members.

    A truncated or member-less archive, a missing path or an image folder
    without class folders fails here, before Prefect or TensorFlow start
    (``vit-pipeline run``). The pickles' contents are checked when they are read.
    """
    path = source_path or cfg.data_path
    if cfg.dataset == "cifar100" and path:
        path = Path(path)
        if not path.exists():
            raise DataError(f"CIFAR-100 path does not exist: {path}")
        if path.is_dir():
            _cifar_dir(path)
            return
        try:
            with tarfile.open(path, "r:*") as tar:
                _archive_members(tar, path)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise _archive_error(path, exc) from exc
    elif cfg.dataset == "image_folder":
        list_splits(image_folder_layout(Path(path)))  # a listing, no decoding: quick even for large folders


def _read_cifar_members(path: Path) -> dict[str, Any]:
    """Reads meta/train/test pickles from a directory or a .tar.gz archive."""
    out: dict[str, Any] = {}
    if path.is_dir():
        base = _cifar_dir(path)
        for name in CIFAR100_MEMBERS:
            with open(base / name, "rb") as f:
                out[name] = safe_unpickle(f, f"{base / name}")
        return out
    try:
        with tarfile.open(path, "r:*") as tar:
            members = _archive_members(tar, path)
            for name in CIFAR100_MEMBERS:
                stream = tar.extractfile(members[name])
                # Read fully first so a truncated archive fails here, not mid-pickle.
                out[name] = safe_unpickle(io.BytesIO(stream.read()), f"{path}:{members[name].name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _archive_error(path, exc) from exc
    return out


def _archive_error(path: Path, exc: BaseException) -> DataError:
    """One line: what the archive is not (tarfile's own message lists every method it tried)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return DataError(f"{path} is a .zip archive; give the official .tar.gz or the extracted folder")
    first = " ".join(str(exc).split())[:200]
    return DataError(f"Could not read archive {path} (truncated or corrupt?): {first}")


def read_cifar100(
    path: str | os.PathLike, label_mode: str = "fine"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Reads an official ``cifar-100-python`` directory or ``.tar.gz``.

    Returns:
        ``(x_train, y_train, x_test, y_test, class_names)`` with uint8 images of
        shape (N, 32, 32, 3).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"CIFAR-100 path does not exist: {path}")
    members = _read_cifar_members(path)
    label_key = f"{label_mode}_labels"
    x_train, y_train = _decode_batch(members["train"], f"{path}:train", label_key)
    x_test, y_test = _decode_batch(members["test"], f"{path}:test", label_key)
    names_key = f"{label_mode}_label_names"
    meta = members["meta"]
    # Python 2 pickles (the official archive) have bytes keys, Python 3 ones str.
    meta = {_text(k): v for k, v in meta.items()} if isinstance(meta, dict) else {}
    if names_key not in meta:
        raise DataError(f"{path}:meta has no {names_key} entry")
    class_names = [_text(n) for n in meta[names_key]]
    return x_train, y_train, x_test, y_test, class_names


# config.SPLIT_FOLDER_NAMES -> the split each holds (the names Keras, torchvision, Kaggle and Roboflow use).
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}  # fmt: skip
assert set(SPLIT_FOLDERS) == set(SPLIT_FOLDER_NAMES)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name.casefold() not in IGNORED_FOLDERS)  # fmt: skip


def _class_key(name: str) -> str:
    """A class folder's name as compared across splits: NFC (macOS writes names NFD)."""
    return unicodedata.normalize("NFC", name)


# Words beside a split's name in the split folders people download (Kaggle's training_set/, seg_train/,
# train_images/, testset/, train_2/): a name with any other word (training_wheels/, test_tube/) names a class.
SPLIT_NAME_WORDS = frozenset(
    {"set", "sets", "data", "dataset", "images", "imgs", "img", "split", "seg", "files", ""}
)
# Other names of a split: ML's train/dev/test; VOC's trainval (train and val together: val is split from it).
SPLIT_ALIASES = {"dev": "val", "trainval": "train"}
_SPLIT_OF = {**SPLIT_FOLDERS, **SPLIT_ALIASES}
_SPLIT_WORD = re.compile(rf"({'|'.join(sorted({*SPLIT_FOLDERS, *SPLIT_ALIASES}, key=len, reverse=True))})"
                         rf"({'|'.join(sorted(SPLIT_NAME_WORDS - {''}, key=len, reverse=True))})?")  # fmt: skip


def _split_name(name: str) -> str | None:
    """The split a folder's name says (``train``, ``val``, ``test``), or None: the names of ``SPLIT_FOLDERS`` and
    ``SPLIT_ALIASES``, alone or with only the words of ``SPLIT_NAME_WORDS`` and numbers (``training_set``,
    ``seg_test``, ``testset``, ``train_2``); ``train_val`` is ``trainval``."""
    said, rest = set(), []
    for word in re.split(r"[^a-z0-9]+", name.lower()):
        if match := _SPLIT_WORD.fullmatch(word):
            said.add(_SPLIT_OF[match.group(1)])
        elif word not in SPLIT_NAME_WORDS and not re.fullmatch(r"v?\d+", word):
            rest.append(word)
    if said == {"train", "val"}:  # train_val/: trainval
        said = {"train"}
    return said.pop() if len(said) == 1 and not rest else None


def _holds_class_folders(folder: Path) -> bool:
    """A split folder holds class folders and no images of its own (a class folder named ``train``, as
    CIFAR-100 has, holds images)."""
    try:
        return not _own_images(folder) and bool(_subdirs(folder))
    except (OSError, DataError):  # unreadable: not read as a split
        return False


def _class_set(folder: Path) -> frozenset[str]:
    """The class folder names under ``folder``, as compared across splits (``_class_key``)."""
    return frozenset(_class_key(c.name) for c in _subdirs(folder))


def _classes_without(y: np.ndarray, names: list[str]) -> list[str]:
    """The classes of ``names`` that no label of ``y`` names (a split left them without a training image)."""
    return [names[c] for c in range(len(names)) if not np.any(y == c)]


def _not_a_folder(root: Path) -> DataError:
    if root.is_file():
        kind = (
            "an archive: extract it"
            if root.suffix.lower() in (".zip", ".tar", ".gz", ".tgz", ".7z")
            else "a file"
        )
        return DataError(f"Image folder {root} is {kind}; give the folder that holds the class folders")
    return DataError(f"Image folder does not exist or is not a directory: {root}")


def image_folder_layout(root: Path) -> dict[str, Path]:
    """Which folders hold which split: ``{"all": root}`` for ``root/<class>/...``, or
    ``{"train": ..., "val": ..., "test": ...}`` (val and test optional) for
    ``root/{train|training, val|valid|validation, test|testing}/<class>/...`` (the Keras
    ``image_dataset_from_directory`` / torchvision ``ImageFolder`` layout; ``_split_name`` reads
    Kaggle's ``training_set``/``test_set`` too).

    Raises:
        DataError: no class folders, two folders for one split, split folders without one for training or
            beside other folders (they would be taken as classes: a classifier of "which split"), or splits
            whose class folders differ (naming the difference).
    """
    if not root.is_dir():
        raise _not_a_folder(root)
    subdirs = _subdirs(root)
    if not subdirs:
        raise DataError(f"Image folder {root} has no class sub-folders")
    splits = {p: SPLIT_FOLDERS.get(p.name.lower()) for p in subdirs}
    if not all(splits.values()):  # other names: split folders only where their contents say so too
        splits = {p: split for p in subdirs if (split := _split_name(p.name)) and _holds_class_folders(p)}
    if len(splits) < len(subdirs):
        inner = {_class_set(p) for p in splits}
        alike = [p for p in subdirs if p not in splits and _class_set(p) in inner]
        if alike:  # train/ beside eval/ holding the same class folders: a split with a name not read as one
            raise DataError(f"Image folder {root} holds split folders ({', '.join(p.name for p in splits)}) and "
                            f"{', '.join(p.name for p in alike)[:200]}, with the same class folders: name each split "
                            "train/, val/ (or dev/) or test/")  # fmt: skip
        if splits:  # one split folder beside class folders (train/ and unlabeled/) is no class either
            raise DataError(f"Image folder {root} holds split folders ({', '.join(p.name for p in splits)}) beside "
                            f"other folders ({', '.join(p.name for p in subdirs if p not in splits)[:200]}); give a "
                            "folder that holds only split folders, or only class folders (a class folder named as "
                            "a split holds its images, not only sub-folders)")  # fmt: skip
        return {"all": root}
    if "train" not in splits.values():
        raise DataError(f"Image folder {root} holds split folders ({', '.join(p.name for p in subdirs)}) but none to "
                        "train on (train/, training/)")  # fmt: skip
    layout: dict[str, Path] = {}
    for p in subdirs:
        split = splits[p]
        if split in layout:
            raise DataError(f"Image folder {root} has both {layout[split].name}/ and {p.name}/; keep one")
        layout[split] = _unwrapped(p)
    classes = {split: sorted(_class_set(p)) for split, p in layout.items()}
    if not classes["train"]:
        raise DataError(f"Image folder {layout['train']} has no class sub-folders")
    for split, found in classes.items():
        if not found:  # Kaggle's train/<class>/ beside an unlabeled test/*.png
            raise DataError(f"Split folder {layout[split]} has no class sub-folders ({_own_images(layout[split])} "
                            f"images of its own: unlabeled?); sort them into class folders, or give "
                            f"{layout['train']} alone (its {split} images are then split from it)")  # fmt: skip
        if sorted(found) != sorted(classes["train"]):
            missing = sorted(set(classes["train"]) - set(found))
            extra = sorted(set(found) - set(classes["train"]))
            raise DataError(
                f"Class folders of {layout[split]} differ from {layout['train']}: "
                f"missing {missing[:10]}, extra {extra[:10]}"
            )
    return layout


def _unwrapped(folder: Path) -> Path:
    """``folder``, or the folder of its own name it alone holds (Kaggle's archives unpack to
    ``training_set/training_set/<class>/`` and ``seg_train/seg_train/``)."""
    while (
        not _own_images(folder)
        and len(inner := _subdirs(folder)) == 1
        and (_class_key(inner[0].name).casefold() == _class_key(folder.name).casefold())
    ):
        folder = inner[0]
    return folder


def _own_images(folder: Path) -> int:
    """How many image files (by suffix) lie in ``folder`` itself, outside its sub-folders."""
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DataError(f"Cannot list {folder}: {exc.strerror or exc}") from None
    return sum(not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
               and os.path.isfile(os.path.join(folder, n)) for n in names)  # fmt: skip


def _image_files(class_dir: Path) -> list[str]:
    """The image files (by suffix) anywhere under ``class_dir``, as ``image_dataset_from_directory`` finds
    them: sub-folders included, symbolic links followed (each real folder once), hidden files skipped."""

    def unreadable(
        exc: OSError,
    ) -> None:  # os.walk leaves out a folder it cannot list: its images would be lost
        raise DataError(f"Cannot list {exc.filename} (in class folder {class_dir}): {exc.strerror or exc}")

    found, seen = [], set()
    for here, dirs, files in os.walk(class_dir, onerror=unreadable, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d.casefold() not in IGNORED_FOLDERS]
        found += [os.path.join(here, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]  # fmt: skip
    return sorted(f for f in found if os.path.isfile(f))


def list_class_files(
    folder: Path, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The image files (by suffix, ``IMAGE_SUFFIXES``) under ``folder/<class>/`` and their labels, undecoded.

    Class names are NFC-normalised (the files of an NFC and an NFD folder of one name are one class);
    ``class_names`` (another split's) are matched the same way.

    Returns:
        ``(paths as strings, labels, class_names)``.
    """
    if not folder.is_dir():
        raise _not_a_folder(folder)
    class_dirs: dict[str, list[Path]] = {}  # one class per NFC name: an NFC and an NFD folder are one class
    for p in _subdirs(folder):
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:  # a zip or tar written in another encoding: the name cannot be stored
            raise DataError(f"Class folder name {p.name!r} in {folder} is not UTF-8 text (an archive written in "
                            "another encoding?); rename it") from None  # fmt: skip
        class_dirs.setdefault(_class_key(p.name), []).append(p)
    if not class_dirs:
        raise DataError(f"Image folder {folder} has no class sub-folders")
    names = class_names or sorted(class_dirs)
    if len(names) < 2:
        inner = class_dirs[names[0]][0]
        hint = f"; is {inner} the folder of class folders?" if len(_subdirs(inner)) >= 2 else ""
        raise DataError(f"Expected at least 2 class folders in {folder}. Received: {len(names)} ({names[0]!r}); "
                        f"a classifier needs two classes or more, one folder of images each{hint}")  # fmt: skip
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        if name not in class_dirs:
            raise DataError(f"Image folder {folder} has no class folder {name!r}")
        found = sorted(f for d in class_dirs[name] for f in _image_files(d))
        if not found and class_names is None:  # another split's class may have no images here (untested)
            raise DataError(f"Class folder {class_dirs[name][0]} has no readable images (no file named "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}, in it or its sub-folders)")  # fmt: skip
        files += found
        labels += [label] * len(found)
    return np.array(files), np.asarray(labels, dtype=np.int32), names


def list_splits(layout: dict[str, Path]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """``list_class_files`` of every folder of an ``image_folder_layout``, with one class list."""
    listed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    names = None
    for split in ("all", "train", "val", "test"):
        if split in layout:
            files, labels, names = list_class_files(layout[split], names)
            listed[split] = (files, labels)
    return listed, names


def read_class_folders(
    folder: Path, size: int, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Reads ``folder/<class>/*`` into memory: RGB, resized to ``size`` x ``size``.

    Unreadable or non-image files are skipped and counted (logged), not fatal:
    one bad JPEG in a folder of thousands should not stop a training run. For
    folders of any size, ``prepare`` decodes into shards instead.

    Returns:
        ``(images, labels, class_names, skipped)``.
    """
    from vit_pipeline.shards import decode_image

    files, labels, names = list_class_files(folder, class_names)
    decoded = [decode_image(Path(f), size) for f in files]
    keep = [i for i, img in enumerate(decoded) if img is not None]
    _check_classes_readable(labels[keep], names, folder)
    return np.stack([decoded[i] for i in keep]), labels[keep], names, len(files) - len(keep)


def _check_classes_readable(labels: np.ndarray, names: list[str], folder: Path) -> None:
    counts = np.bincount(labels, minlength=len(names))
    if (counts == 0).any():
        raise DataError(f"Class folder {folder / names[int(np.argmin(counts))]} has no readable images")


def read_image_folder(root: str | os.PathLike, size: int) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Reads ``root/<class>/*.png|jpg`` (one folder, no splits); see ``read_class_folders``."""
    return read_class_folders(Path(root), size)


def _shard_splits(
    cfg: PipelineConfig, splits: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: Path
) -> tuple[dict[str, tuple[ShardedImages, np.ndarray]], int]:
    """Decodes each split's file list into shards; returns the splits and the files skipped."""
    from vit_pipeline.progress import task

    out: dict[str, tuple[ShardedImages, np.ndarray]] = {}
    skipped = 0
    total = sum(len(files) for files, _ in splits.values())
    with task(f"Decoding {total} images into shards ({cfg.input_size}x{cfg.input_size})", total) as shown:
        for split, (files, labels) in splits.items():
            # Shuffled (seeded) so that every shard mixes the classes: training reads shard by shard.
            order = np.random.default_rng([cfg.seed, len(out)]).permutation(len(files))
            images, kept, bad = write_shards([Path(f) for f in files[order]], labels[order], out_dir, split,
                                             cfg.input_size, shown=shown)  # fmt: skip
            skipped += bad
            out[split] = (images, kept)
    if skipped:
        log.warning("Skipped %d unreadable files in %s", skipped, cfg.data_path)
    return out, skipped


# -------------------------------------------------------------------- splitting
def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Deterministic stratified split of ``fraction`` of the images into the second part.

    A class with a single image cannot be stratified: it stays whole on the first (training) side
    and the other classes are stratified as before; only when too few images are held out for one
    of each class is the split random.
    """
    from sklearn.model_selection import train_test_split

    n_hold = int(round(len(y) * fraction))
    if n_hold < 1 or n_hold >= len(y):
        raise DataError(f"Cannot hold out {fraction:.0%} of {len(y)} images")
    counts = np.bincount(y)
    single = counts[y] == 1
    rest = np.flatnonzero(~single)
    classes = len(np.unique(y[rest]))
    if classes and classes <= n_hold <= len(rest) - classes:
        a, b = train_test_split(rest, test_size=n_hold, random_state=seed, stratify=y[rest])
        if single.any():
            a = np.concatenate([a, np.flatnonzero(single)])
    else:  # random, but one image of each class stays on the training side while there are others to hold
        first = np.unique(y, return_index=True)[1]
        others = np.setdiff1d(np.arange(len(y)), first)
        if 1 <= n_hold < len(others):
            a, b = train_test_split(others, test_size=n_hold, random_state=seed)
            a = np.concatenate([first, a])
        elif n_hold == len(others):
            a, b = first, others
        else:  # every other image held out, and only as many classes' one image as the fraction needs
            a, b = train_test_split(first, test_size=n_hold - len(others), random_state=seed)
            b = np.concatenate([others, b])
    return x[a], y[a], x[b], y[b]


def _cap(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(y):
        return x, y
    _, _, x_keep, y_keep = _split(x, y, limit / len(y), seed)
    return x_keep, y_keep


def validate_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, what: str) -> None:
    """Checks shape, dtype, label range; raises DataError naming the problem."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"Expected {what} images of shape (N, H, W, 3). Received: shape={x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"Expected {what} images of dtype uint8. Received: dtype={x.dtype}")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{what} split is empty")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(
            f"Expected {what} labels in [0, {num_classes}). Received: min={y.min()}, max={y.max()}"
        )


def prepare(
    cfg: PipelineConfig,
    source_path: str | os.PathLike | None = None,
    shard_dir: str | os.PathLike | None = None,
) -> Splits:
    """Loads the configured source and returns validated train/val/test splits.

    Args:
        cfg: The pipeline config.
        source_path: Where a fetched dataset lies (from ``fetch``); overrides
            ``cfg.data_path``.
        shard_dir: Where an image folder's shards go (the run's work directory);
            None: a new folder in the process's scratch folder, removed when the process exits.
    """
    if cfg.dataset == "image_folder":
        return _prepare_folder(cfg, Path(source_path or cfg.data_path), shard_dir)
    info: dict[str, Any] = {}
    path = source_path or cfg.data_path
    if cfg.dataset == "digits":
        x, y, names = load_digits_rgb()
        x_rest, y_rest, x_test, y_test = _split(x, y, cfg.test_split, cfg.seed)
        source = "sklearn.datasets.load_digits"
    elif cfg.dataset == "cifar100":
        if path is None:
            path = fetch_cifar100()
        x_rest, y_rest, x_test, y_test, names = read_cifar100(path, cfg.label_mode)
        source = str(Path(path).resolve())
    else:  # validated in config; kept for type checkers
        raise DataError(f"Unknown dataset {cfg.dataset!r}")

    num_classes = len(names)
    for arr_x, arr_y, what in ((x_rest, y_rest, "train"), (x_test, y_test, "test")):
        validate_arrays(arr_x, arr_y, num_classes, what)
    if x_rest.shape[1:3] != (cfg.input_size, cfg.input_size):
        raise DataError(
            f"Expected images of {cfg.input_size}x{cfg.input_size}. Received: {x_rest.shape[1:3]}"
        )
    x_rest, y_rest = _cap(x_rest, y_rest, cfg.max_train_images, cfg.seed)
    x_test, y_test = _cap(x_test, y_test, cfg.max_test_images, cfg.seed)
    x_train, y_train, x_val, y_val = _split(x_rest, y_rest, cfg.validation_split, cfg.seed)
    if empty := _classes_without(y_train, names):
        raise DataError(f"{len(empty)} classes have no training images, e.g. {empty[:5]}")
    return Splits(
        x_train, y_train.astype(np.int32), x_val, y_val.astype(np.int32),
        x_test, y_test.astype(np.int32), list(names), source=source, info=info,
    )  # fmt: skip


def _prepare_folder(cfg: PipelineConfig, root: Path, shard_dir: str | os.PathLike | None) -> Splits:
    """An image folder: split on the file lists, then decoded split by split into shards."""

    layout = image_folder_layout(root)
    listed, names = list_splits(layout)
    unlabeled = _unlabeled_images(root, layout)
    # Files that are not images (by their header) leave before the split: a split made of them is empty.
    listed, unreadable = _readable(listed)
    split = "train" if "train" in listed else "all"
    _check_classes_readable(listed[split][1], names, layout[split])
    files_rest, y_rest = listed[split]
    if "test" in listed:
        files_test, y_test = listed["test"]
    else:
        files_rest, y_rest, files_test, y_test = _split(files_rest, y_rest, cfg.test_split, cfg.seed)
    files_rest, y_rest = _cap(files_rest, y_rest, cfg.max_train_images, cfg.seed)
    files_test, y_test = _cap(files_test, y_test, cfg.max_test_images, cfg.seed)
    if "val" in listed:
        (files_train, y_train), (files_val, y_val) = (files_rest, y_rest), listed["val"]
    else:
        files_train, y_train, files_val, y_val = _split(files_rest, y_rest, cfg.validation_split, cfg.seed)
    if empty := _classes_without(y_train, names):  # before any decoding
        raise DataError(f"{len(empty)} classes have no training image left after the test and validation splits "
                        f"(e.g. {empty[:5]}): too few images per class for --test-split {cfg.test_split:g} and "
                        f"--validation-split {cfg.validation_split:g}")  # fmt: skip
    out_dir = Path(shard_dir) if shard_dir else scratch_dir("vit-shards-")
    decoded, skipped = _shard_splits(
        cfg, {"train": (files_train, y_train), "val": (files_val, y_val), "test": (files_test, y_test)},
        out_dir,
    )  # fmt: skip
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = decoded["train"], decoded["val"], decoded["test"]
    _check_classes_readable(y_train, names, layout.get("train", layout.get("all")))
    for y, what in ((y_train, "train"), (y_val, "val"), (y_test, "test")):
        if len(y) == 0:
            raise DataError(f"{what} split is empty")
    info = {"splits_given": ",".join(s for s in ("train", "val", "test") if s in layout) or "none",
            "skipped_files": skipped + unreadable, "unlabeled_files": unlabeled, "shards": len(x_train.paths) + len(x_val.paths) + len(x_test.paths)}  # fmt: skip
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, list(names), source=str(root.resolve()),
                  info=info)  # fmt: skip


def _unlabeled_images(root: Path, layout: dict[str, Path]) -> int:
    """Images beside the class folders (in the root, or a split folder, itself): in no class, left out and said."""
    count = 0
    for folder in dict.fromkeys([root, *layout.values()]):
        if n := _own_images(folder):
            log.warning("Leaving out %d image files in %s itself: they are in no class folder", n, folder)
            count += n
    return count


def _readable(listed: dict[str, tuple[np.ndarray, np.ndarray]]
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:  # fmt: skip
    """Each split's files whose header Pillow reads (the pixels are decoded later, into shards)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from vit_consumer import contract

    def header_ok(path: str) -> bool:
        try:  # the formats the decoder reads (and the service): an AVIF named .jpg is not one
            with Image.open(path, formats=contract.IMAGE_FORMATS) as img:
                return img.size[0] > 0 and img.size[1] > 0
        except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, DecompressionBombError...)
            log.warning("Skipping unreadable image %s: %s", path, " ".join(str(exc).split())[:200])
            return False

    out, bad = {}, 0
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for split, (files, labels) in listed.items():
            keep = np.fromiter(pool.map(header_ok, map(str, files)), bool, len(files))
            out[split] = (files[keep], labels[keep])
            bad += int((~keep).sum())
    return out, bad


# --------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class Prepared:
    """What the data stage hands on: the saved split, its summary and the class names."""

    data_path: str
    summary: dict[str, Any]
    class_names: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"data_path": self.data_path, "summary": self.summary, "class_names": self.class_names}


def fetch(cfg: PipelineConfig) -> str | None:
    """Makes sure the raw data is local; returns its path (None: built in).

    The only step of the stage worth retrying (a download); the flow retries it alone.
    """
    if cfg.dataset == "cifar100" and not cfg.data_path:
        return str(fetch_cifar100())
    return cfg.data_path


def run(ctx: StageContext, source_path: str | None = None) -> Prepared:
    """The data stage: loads, splits and validates the data, saves it, logs the dataset to MLflow.

    A resumed run keeps the split it started with (and its logged input).
    """
    path = ctx.work_dir / "data.npz"
    if path.exists():
        splits = Splits.load(path)
        log.info("Reusing prepared data %s", path)
        return Prepared(str(path), splits.summary(), splits.class_names)
    shards = path.parent / "shards"
    try:
        splits = prepare(ctx.cfg, source_path, shard_dir=shards)
        path = splits.save(path)
    except BaseException:  # nothing half-prepared stays behind (a resume prepares again)
        shutil.rmtree(shards, ignore_errors=True)
        raise
    summary = splits.summary()
    _log_dataset(ctx, splits, summary)
    log.info("Prepared %s: %s", ctx.cfg.dataset_tag, summary)
    return Prepared(str(path), summary, splits.class_names)


def _log_dataset(ctx: StageContext, splits: Splits, summary: dict[str, Any]) -> None:
    """The dataset as an MLflow dataset input (source, digest), its sizes as params, its summary as JSON."""
    import warnings

    import mlflow
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(
            splits.x_train[:64], targets=splits.y_train[:64], source=summary["source"],
            name=ctx.cfg.dataset_tag, digest=summary["digest"][:16],
        )  # fmt: skip
    # The schema comes from a 64-image sample (MLflow reads the arrays it is given); the profile states the
    # whole training split (the sample's shapes would say 64 images).
    sample = dataset._to_mlflow_entity()
    n, shape = len(splits.y_train), tuple(int(d) for d in splits.x_train.shape[1:])
    profile = {"features_shape": [n, *shape], "features_size": n * int(np.prod(shape)),
               "features_nbytes": n * int(np.prod(shape)), "targets_shape": [n], "targets_size": n,
               "targets_nbytes": n * np.dtype(np.int32).itemsize}  # fmt: skip
    entity = Dataset(
        sample.name, sample.digest, sample.source_type, sample.source, sample.schema, json.dumps(profile)
    )
    context = InputTag(key="mlflow.data.context", value="training")
    ctx.log.client.log_inputs(ctx.run_id, datasets=[DatasetInput(entity, tags=[context])])
    sizes = (
        "source",
        "num_classes",
        "train_size",
        "val_size",
        "test_size",
        "digest",
        "skipped_files",
        "unlabeled_files",
    )
    ctx.log.params({f"data.{key}": summary[key] for key in sizes if key in summary})
    ctx.log.dict({"class_names": splits.class_names, **summary}, "data/dataset.json")

"""CIFAR-100 split by classes into image folders: a pre-training task and a small transfer task.

The transfer experiment (``vit-pipeline transfer-experiment``) pre-trains on some
classes and fine-tunes on the others, so no image or class of the target task is
seen in pre-training. The folders are ordinary image folders
(``ROOT/{train,test}/<class>/*.png``), the layout any user's data has, so the
target task can be replaced by a folder the user brings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vit_pipeline.data import read_cifar100
from vit_pipeline.errors import DataError


@dataclass(frozen=True)
class ClassSplit:
    """Where the two folders went and which classes each holds."""

    source_root: Path
    target_root: Path
    source_classes: list[str]
    target_classes: list[str]


def pick_target_classes(class_names: list[str], count: int, seed: int) -> list[str]:
    """``count`` class names drawn without replacement with ``seed`` (the rest pre-train)."""
    if not 0 < count < len(class_names):
        raise DataError(f"Expected 0 < target classes < {len(class_names)}. Received: target_classes={count}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(class_names, size=count, replace=False).tolist())


def _write_folder(
    root: Path, split: str, x: np.ndarray, y: np.ndarray, names: list[str], keep: list[int]
) -> int:
    from PIL import Image

    written = 0
    for label in keep:
        folder = root / split / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == label):
            Image.fromarray(x[i]).save(folder / f"{i:06d}.png")
            written += 1
    return written


def _per_class_cap(y: np.ndarray, labels: list[int], cap: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``cap`` images of each label (seeded), in index order."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in labels:
        idx = np.flatnonzero(y == label)
        if cap is not None and len(idx) > cap:
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def split_by_classes(
    cifar_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    target_classes: int = 10,
    target_train_per_class: int | None = 50,
    seed: int = 0,
) -> ClassSplit:
    """Writes ``out_dir/source`` (the other classes, all images) and ``out_dir/target`` (``target_classes``
    classes, at most ``target_train_per_class`` training images each, all their test images).

    Idempotent: a folder already written completely (``.complete`` marker) is kept.
    """
    out = Path(out_dir)
    x_train, y_train, x_test, y_test, names = read_cifar100(cifar_path)
    target = pick_target_classes(names, target_classes, seed)
    target_ids = [names.index(n) for n in target]
    source_ids = [i for i in range(len(names)) if i not in target_ids]
    plan = {
        "source": (source_ids, None),
        "target": (target_ids, target_train_per_class),
    }
    for name, (labels, cap) in plan.items():
        root = out / name
        if (root / ".complete").exists():
            continue
        train_idx = _per_class_cap(y_train, labels, cap, seed)
        _write_folder(root, "train", x_train[train_idx], y_train[train_idx], names, labels)
        _write_folder(root, "test", x_test, y_test, names, labels)
        (root / ".complete").write_text("")
    return ClassSplit(out / "source", out / "target", [names[i] for i in source_ids], target)

"""Writes tests/assets/cifar-100-cut.tar.gz: a small cut of the shared CIFAR-100 sample.

Usage: python tests/assets/make_cifar_cut.py ../shared/data/cifar100-sample/cifar-100-python.tar.gz

Keeps the official ``cifar-100-python`` member names and pickle layout, with
3 train and 3 test images per fine class (300 + 300 real images), so tests are
self-contained and exercise the same reader as a real download.
"""

import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

from vit_pipeline.data import safe_unpickle

PER_CLASS = 3


def _cut(batch: dict, per_class: int) -> dict:
    labels = np.asarray(batch[b"fine_labels"])
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(100)])
    keep.sort()
    return {
        b"filenames": [batch[b"filenames"][i] for i in keep],
        b"batch_label": batch[b"batch_label"],
        b"fine_labels": [int(batch[b"fine_labels"][i]) for i in keep],
        b"coarse_labels": [int(batch[b"coarse_labels"][i]) for i in keep],
        b"data": np.ascontiguousarray(np.asarray(batch[b"data"])[keep]),
    }


def main(src: str, dst: str) -> None:
    members = {}
    with tarfile.open(src) as tar:
        for name in ("meta", "train", "test"):
            members[name] = safe_unpickle(tar.extractfile(f"cifar-100-python/{name}"), name)
    members["train"] = _cut(members["train"], PER_CLASS)
    members["test"] = _cut(members["test"], PER_CLASS)
    with tarfile.open(dst, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=4)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


if __name__ == "__main__":
    main(sys.argv[1], str(Path(__file__).with_name("cifar-100-cut.tar.gz")))

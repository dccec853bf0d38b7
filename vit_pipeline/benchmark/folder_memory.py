"""Peak memory of prepare and train on image folders of growing size (a benchmark, not a test).

    python -m vit_pipeline.benchmark.folder_memory --images 4000,16000 --out docs/benchmarks/3-large-folder

Writes a synthetic folder of real-size JPEGs (500x375, the size of a typical
photo in ImageNet; smooth colour fields with noise, so they compress like photos)
for each size, then, each in a fresh child process: the sharded ``prepare`` alone,
``prepare`` followed by one training epoch, and, for comparison, the in-memory
reader (every image decoded into one array). Peak memory is the child's VmHWM.
The claim it checks: the sharded path's peak does not grow with the folder,
while the in-memory one grows with the decoded size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vit_pipeline.benchmark.child import run_child
from vit_pipeline.benchmark.environment import environment
from vit_pipeline.config import parse_int_list
from vit_pipeline.fsutil import write_text

PHOTO = (500, 375)
CLASSES = 10

MARKER = "FOLDER "
_CHILD = r"""
import sys, time
from pathlib import Path
mode, root, size, work = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
# The same imports in every mode, before the baseline, so the growth is the data's.
import rich.progress, sklearn.model_selection, PIL.Image
from vit_pipeline import data, shards
from vit_pipeline.config import make_config
from vit_pipeline.benchmark.child import report
from vit_pipeline.benchmark.memory import current_rss_mib, peak_rss_mib
if mode == "prepare+train":
    import keras, tensorflow
    from vit_pipeline.train import train
cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(root), "input_size": size,
                  "image_size": size, "patch_size": 8, "epochs": 1, "batch_size": 128})
out = {"mode": mode, "baseline_mib": current_rss_mib()}
start = time.perf_counter()
if mode == "in-memory":
    x, y, names, skipped = data.read_class_folders(root, size)
    out["decoded_mib"] = x.nbytes / 2**20
else:
    splits = data.prepare(cfg, shard_dir=work / "shards")
    out["shards"] = splits.info["shards"]
    out["prepare_seconds"] = time.perf_counter() - start
    out["prepare_peak_mib"] = peak_rss_mib()
    if mode == "prepare+train":
        result = train(cfg, splits, work / "train")
        out["train_seconds"] = result.train_seconds
out["seconds"] = time.perf_counter() - start
out["peak_mib"] = peak_rss_mib()
out["growth_mib"] = out["peak_mib"] - out["baseline_mib"]
report(sys.argv[5], out)  # the marker measure() reads
"""


def make_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``images`` JPEGs of ``PHOTO`` size in ``CLASSES`` class folders (reused when complete)."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    w, h = PHOTO
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(images):
        cls = root / f"class{i % CLASSES:02d}"
        cls.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(0, 255, 3)
        img = c + 120 * np.sin(xx[..., None] / w * 6 * a + yy[..., None] / h * 6 * b)
        img += rng.normal(0, 12, (h, w, 1))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(cls / f"{i:06d}.jpg", quality=90)
    done.write_text(str(images))
    return root


def measure(mode: str, root: Path, size: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    result = run_child(["-c", _CHILD, mode, str(root), str(size), str(work), MARKER], MARKER, timeout=3600)
    if "error" in result:
        raise RuntimeError(f"{mode} on {root} failed: {result['error']}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="4000,16000", help="folder sizes, comma-separated")
    parser.add_argument("--size", type=int, default=64, help="input_size the images are decoded to")
    parser.add_argument("--folders", default="/tmp/vit-folder-bench", help="where the synthetic folders go")
    parser.add_argument("--out", default="docs/benchmarks/3-large-folder")
    args = parser.parse_args(argv)
    rows = []
    for n in parse_int_list(args.images):
        started = time.perf_counter()
        root = make_folder(Path(args.folders) / f"jpeg-{n}", n)
        print(f"folder of {n} JPEGs ready ({time.perf_counter() - started:.0f} s)", flush=True)
        row = {"images": n, "decoded_mib": n * args.size * args.size * 3 / 2**20,
               "folder_mib": sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20}  # fmt: skip
        for mode in ("prepare", "prepare+train", "in-memory"):
            work = Path(args.folders) / f"work-{n}-{mode.replace('+', '-')}"
            row[mode] = measure(mode, root, args.size, work)
            print(f"{n} images, {mode}: {row[mode]}", flush=True)
        rows.append(row)
    report = {"environment": environment(), "image_size": args.size, "photo_size": list(PHOTO), "rows": rows,
              "command": "python -m vit_pipeline.benchmark.folder_memory " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    out = Path(args.out)
    write_text(out / "report.json", json.dumps(report, indent=1))
    write_text(out / "report.md", markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"Peak memory (VmHWM of a fresh process) on folders of {report['photo_size'][0]}x{report['photo_size'][1]} "
        f"JPEGs decoded to {report['image_size']}x{report['image_size']}; command: `{report['command']}`",
        "",
        "| images | JPEG folder MiB | decoded MiB | shards | sharded prepare: peak (growth) MiB "
        "| prepare + 1 epoch: peak (growth) MiB | in-memory reader: peak (growth) MiB | prepare s | epoch s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(m: dict) -> str:
        return f"{m['peak_mib']:.0f} ({m['growth_mib']:+.0f})"

    for r in rows:
        lines.append(
            f"| {r['images']} | {r['folder_mib']:.0f} | {r['decoded_mib']:.0f} | {r['prepare']['shards']} "
            f"| {cell(r['prepare'])} | {cell(r['prepare+train'])} | {cell(r['in-memory'])} "
            f"| {r['prepare']['prepare_seconds']:.0f} | {r['prepare+train']['train_seconds']:.0f} |"
        )
    lines += ["", "Growth: peak minus the process's memory after its imports (before any image is read)."]
    if len(rows) > 1:
        a, b = rows[0], rows[-1]

        def grew(mode: str) -> str:
            return f"{a[mode]['growth_mib']:.0f} -> {b[mode]['growth_mib']:.0f} MiB"

        lines += ["", f"From {a['images']} to {b['images']} images ({b['images'] / a['images']:.1f}x the data, "
                  f"decoded {a['decoded_mib']:.0f} -> {b['decoded_mib']:.0f} MiB), the growth went: sharded prepare "
                  f"{grew('prepare')}, prepare + epoch {grew('prepare+train')}, in-memory reader {grew('in-memory')}."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

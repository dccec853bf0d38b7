"""Which gate images OpenVINO's default precision flips, and how decided the fp32 model was on them.

Reads a registered version's work folder (``serving_gate.npz``: the gate's real test images with the fp32
Keras logits; ``model.onnx`` and ``model.optimized.onnx``), runs each file on OpenVINO's CPU plugin at its
default precision (bf16 on a CPU with AMX), and prints the top-1 agreement with Keras, the largest logit
difference, and the fp32 top-1 margin (top-1 logit minus top-2 logit) of every image whose top-1 changed,
beside the margin percentiles of all gate images. A second row per file marks every operation of the graph
with OpenVINO's ``disable_fp16_compression`` runtime attribute (the way to keep an operation in f32 under f16
compression) to see whether the CPU plugin's bf16 honours it.

    python gate_flips.py /work/ov-home10/work/RUN_ID
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import openvino as ov


def _top1_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _run(core: ov.Core, model: ov.Model, images: np.ndarray) -> tuple[np.ndarray, str]:
    compiled = core.compile_model(model, "CPU")
    out = np.concatenate([compiled(images[i : i + 64])[0] for i in range(0, len(images), 64)])
    return out, compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    args = parser.parse_args()
    gate = np.load(args.work_dir / "serving_gate.npz")
    images, reference = gate["images"].astype(np.float32), gate["logits"]
    margins = _top1_margin(reference)
    print(f"{len(images)} gate images; fp32 Keras top-1 margin percentiles 1/5/25/50: "
          + " / ".join(f"{m:.5f}" for m in np.percentile(margins, [1, 5, 25, 50]))
          + f"; mean logit std {reference.std(axis=1).mean():.3f}")  # fmt: skip
    core = ov.Core()
    for name in ("model.onnx", "model.optimized.onnx"):
        for marked in (False, True):
            model = core.read_model(args.work_dir / name)
            if marked:
                for op in model.get_ordered_ops():
                    op.get_rt_info()["disable_fp16_compression_0"] = ""
            out, precision = _run(core, model, images)
            flipped = np.argmax(out, axis=1) != np.argmax(reference, axis=1)
            print(f"{name} ({precision}{', every op marked f32' if marked else ''}): agreement "
                  f"{1 - flipped.mean():.2%} ({flipped.sum()} flipped), max |logit diff| "
                  f"{np.abs(out - reference).max():.4f}, fp32 margins of the flipped: "
                  + ", ".join(f"{m:.5f}" for m in sorted(margins[flipped])))  # fmt: skip


if __name__ == "__main__":
    main()

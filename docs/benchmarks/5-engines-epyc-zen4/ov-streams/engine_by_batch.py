"""The served engine alone at several batch sizes, as the service runs it (its parallel requests at once).

    python docs/benchmarks/5-engines-epyc-zen4/ov-streams/engine_by_batch.py MODEL.onnx --streams 0 --streams 1

Prints img/s per batch size and stream setting, the settings taking turns per round (this VM drifts).
"""

from __future__ import annotations

import argparse

import numpy as np
from vit_consumer import OnnxClassifier
from vit_consumer.candidates import time_calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--streams", type=int, action="append", required=True)
    p.add_argument("--batches", default="1,4,9,16,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engines = {s: OnnxClassifier(args.model, engine="openvino", streams=s) for s in args.streams}
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (max(batches), *next(iter(engines.values())).input_shape)).astype(np.float32)
    out: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for s, clf in engines.items():
                calls, wall = time_calls(clf.run, x[:b], args.seconds, clf.runtime.parallel, warm_up=3)
                out.setdefault((s, b), []).append(len(calls) * b / wall)
    for (s, b), values in sorted(out.items()):
        print(f"streams={s} parallel={engines[s].runtime.parallel} batch={b}: "
              f"{np.median(values):.0f} img/s (rounds {', '.join(f'{v:.0f}' for v in values)})")  # fmt: skip


if __name__ == "__main__":
    main()

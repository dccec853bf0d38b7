"""One racing registration (a separate process), for tests/code/test_registry.py.

Usage: registry_worker.py TRACKING_URI NAME FAVOURED_CLASS SPLIT_NPZ READY_FILE GO_FILE

Does everything slow first (imports, the run, the ONNX file), touches READY_FILE,
waits for GO_FILE (the barrier), registers, prints the Registration as JSON.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import constant_classifier
from vit_pipeline import runs, tracking
from vit_pipeline.config import make_config
from vit_pipeline.registry import TestSplit, register_onnx


def main(uri: str, name: str, favoured: int, split_path: str, ready: str, go: str) -> None:
    data = np.load(split_path)
    labels = data["labels"]
    num_classes = int(labels.max()) + 1
    split = TestSplit(data["images"], labels, [f"class{i}" for i in range(num_classes)], "digest")
    cfg = make_config("cifar100", {"tracking_uri": uri, "registered_model_name": name})
    run_id = runs.create_run(cfg, "race")
    path = constant_classifier(Path(ready).with_suffix(".onnx"), num_classes, favoured)
    tracking.client(cfg).get_experiment_by_name(cfg.resolved_experiment_name)  # warm the HTTP session
    Path(ready).touch()
    deadline = time.monotonic() + 300  # the test process may have died
    while not Path(go).exists():
        if time.monotonic() > deadline:
            sys.exit("never released")
        time.sleep(0.001)
    reg = register_onnx(cfg, run_id, str(path), split)
    tracking.client(cfg).set_model_version_tag(name, reg.version, "favoured", str(favoured))
    # Ended as a pipeline run ends: left RUNNING by a process that exits, the next round's reaper took it for a
    # crash and withdrew its promotion (runs.end_run).
    tracking.client(cfg).set_terminated(run_id, "FINISHED")
    print(json.dumps({**reg.to_dict(), "favoured": favoured}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:7])

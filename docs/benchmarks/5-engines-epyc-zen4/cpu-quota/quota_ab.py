"""In a cgroup with a CPU quota: the engines with ``cpu_budget`` (as shipped) against without (their own sizing).

Run it inside the cgroup (cgroup v1 here; root):

    mkdir -p /sys/fs/cgroup/cpu/vittest && echo 100000 > /sys/fs/cgroup/cpu/vittest/cpu.cfs_quota_us
    sh -c 'echo $$ > /sys/fs/cgroup/cpu/vittest/cgroup.procs; exec python docs/benchmarks/5-engines-epyc-zen4/cpu-quota/quota_ab.py MODEL.onnx'

The settings take turns per round; the model is the served file of ../ov-streams (the seed architecture).
"""

import sys

import numpy as np
from vit_consumer import OnnxClassifier, engines
from vit_consumer.candidates import time_calls

M = sys.argv[1]
print("cpu_budget", engines.cpu_budget())
real = engines.cpu_budget
made = {}
for name, budget in (("with budget", real), ("without", lambda: None)):
    engines.cpu_budget = budget
    made[name] = {"ov": OnnxClassifier(M, engine="openvino", streams=0), "ort": OnnxClassifier(M)}
engines.cpu_budget = real
x = np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
res = {}
for _ in range(3):
    for name, e in made.items():
        for k, clf in e.items():
            for b in (1, 32):
                calls, wall = time_calls(clf.run, x[:b], 1.0, clf.runtime.parallel, warm_up=3)
                res.setdefault((k, b, name), []).append(len(calls) * b / wall)
for (k, b, name), v in sorted(res.items()):
    print(f"{k} batch {b} {name}: {np.median(v):.0f} img/s (rounds {', '.join(f'{x:.0f}' for x in v)})")

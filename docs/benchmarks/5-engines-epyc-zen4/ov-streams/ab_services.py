"""Paired A/B of two `serve` settings: both services alive, levels interleaved, order alternating per round.

Each client level and protocol runs on A and on B back to back (which goes first alternates), so the two
see the same moment of this VM's drifting speed; the ratio A/B is taken per round.

    MLFLOW_TRACKING_URI=sqlite:////work/ov-home/mlflow.db python docs/benchmarks/5-engines-epyc-zen4/ov-streams/ab_services.py \
        --model models:/vit-cifar100@champion --cifar ../shared/data/cifar100-sample/cifar-100-python.tar.gz \
        --a=--ov-streams=0 --b=--ov-streams=1 --rounds 6 --seconds 3 --output ab.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "deploy" / "consumer"))
import bench  # noqa: E402


def start(args, port: int, options: list[str]):
    cmd = [sys.executable, "-m", "vit_consumer", "--model", args.model, "--providers", "CPUExecutionProvider",
           "--engine", args.engine, "serve", "--port", str(port), "--max-batch-size", "32",
           "--max-queue-delay-ms", "2", "--no-choose", *options]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cifar", required=True)
    p.add_argument("--engine", default="openvino")
    p.add_argument("--a", action="append", default=[])
    p.add_argument("--b", action="append", default=[])
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    payloads = bench.load_images(argparse.Namespace(images=None, cifar=args.cifar, num_images=256))
    services = {}
    for name, opts in (("A", args.a), ("B", args.b)):
        port = bench.free_port()
        proc = start(args, port, opts)
        services[name] = (port, proc, opts)
    try:
        health = {}
        for name, (port, proc, _) in services.items():
            bench.wait_ready(f"http://127.0.0.1:{port}", proc)
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                health[name] = json.loads(r.read())
            print(
                name,
                services[name][2],
                health[name].get("parallel_requests"),
                health[name]["precision"],
                file=sys.stderr,
            )
        h = health["A"]
        reqs = {}
        for name, (port, _, _) in services.items():
            reqs[name] = {"predict": [bench.request_bytes(port, x) for x in payloads]}
        # v2 binary: decode with a throwaway ORT classifier on the served file is heavy; use the service's shape.
        import io

        from PIL import Image

        decoded = []
        for x in payloads:
            im = (
                Image.open(io.BytesIO(x))
                .convert("RGB")
                .resize(tuple(h["input"]["shape"][1:3][::-1]), Image.BILINEAR)
            )
            decoded.append(np.asarray(im, np.float32))
        import re

        model_name = re.split(r"[@/]", args.model[len("models:/") :], maxsplit=1)[0]
        for name, (port, _, _) in services.items():
            reqs[name]["v2"] = [
                bench.v2_request_bytes(port, model_name, h["input"]["name"], d) for d in decoded
            ]
        clients = [int(c) for c in args.clients.split(",")]
        rows = []
        for r in range(args.rounds):
            for li, c in enumerate(clients):
                for protocol in ("predict", "v2"):
                    order = ["A", "B"] if (r + li) % 2 == 0 else ["B", "A"]
                    for name in order:
                        port = services[name][0]
                        level = asyncio.run(
                            bench.load_level(port, reqs[name][protocol], c, args.seconds, 10**6, lambda: None)
                        )
                        rps = len(level["latencies"]) / level["seconds"]
                        p50 = (
                            bench.percentile(level["latencies"], 50) * 1e3
                            if level["latencies"]
                            else float("nan")
                        )
                        row = {
                            "round": r,
                            "service": name,
                            "clients": c,
                            "protocol": protocol,
                            "req_per_s": rps,
                            "p50_ms": p50,
                            "errors": len(level["errors"]),
                        }
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for _, proc, _ in services.values():
            proc.terminate()
            proc.wait(timeout=30)
    summary = []
    for c in clients:
        for protocol in ("predict", "v2"):
            a = [x for x in rows if x["service"] == "A" and x["clients"] == c and x["protocol"] == protocol]
            b = [x for x in rows if x["service"] == "B" and x["clients"] == c and x["protocol"] == protocol]
            ratios = [x["req_per_s"] / y["req_per_s"] for x, y in zip(a, b, strict=True)]
            summary.append(
                {
                    "clients": c,
                    "protocol": protocol,
                    "A_req_per_s": [round(x["req_per_s"]) for x in a],
                    "B_req_per_s": [round(x["req_per_s"]) for x in b],
                    "A_p50_ms": [round(x["p50_ms"], 2) for x in a],
                    "B_p50_ms": [round(x["p50_ms"], 2) for x in b],
                    "ratio_A_over_B_per_round": [round(x, 3) for x in ratios],
                    "ratio_median": round(statistics.median(ratios), 3),
                    "ratio_of_means": round(
                        np.mean([x["req_per_s"] for x in a]) / np.mean([x["req_per_s"] for x in b]), 3
                    ),
                }
            )
            print(json.dumps(summary[-1]))
    Path(args.output).write_text(
        json.dumps(
            {
                "a": args.a,
                "b": args.b,
                "health": health,
                "rows": rows,
                "summary": summary,
                "cpu": bench.environment(),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

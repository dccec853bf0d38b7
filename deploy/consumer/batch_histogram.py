"""The batch sizes the service forms under load, from its own ``/metrics`` histogram.

    MLFLOW_TRACKING_URI=... python deploy/consumer/batch_histogram.py --model models:/vit-cifar100@champion \
        --cifar ../shared/data/cifar100-sample/cifar-100-python.tar.gz --clients 32 --seconds 6

Starts ``python -m vit_consumer ... serve`` (``--engine``, default auto), drives it with ``bench.py``'s
closed-loop client (real JPEGs to ``/predict``) and prints req/s and the cumulative batch-size buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import urllib.request
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--cifar", required=True, help="a cifar-100-python archive: its test images as JPEGs")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).with_name("bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    payloads = bench.load_images(argparse.Namespace(images=None, cifar=args.cifar, num_images=256))
    port = bench.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "vit_consumer", "--model", args.model, "--engine", args.engine,
                             "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        bench.wait_ready(url, proc)
        requests = [bench.request_bytes(port, p) for p in payloads]
        level = asyncio.run(bench.load_level(port, requests, args.clients, args.seconds, 10**6, lambda: None))
        print(f"{args.clients} clients: {len(level['latencies']) / level['seconds']:.0f} req/s")
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(("vit_consumer_batch_size_bucket", "vit_consumer_batch_size_count")):
                print(line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

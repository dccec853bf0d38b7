"""Load benchmark of the consumer service against its own engine, in one run, loopback only.

    python deploy/consumer/bench.py --model model.onnx --images DIR_OF_JPEGS
    python deploy/consumer/bench.py --model model.onnx --cifar ../shared/data/cifar100-sample/cifar-100-python.tar.gz

1. The engine alone (in this process, no HTTP): the engine and file the service
   chose to serve (its ``/health`` says which: ONNX Runtime or OpenVINO, and at
   what precision), img/s and latency at batch 1 and at the service's
   ``--max-batch-size``, and the JPEG decode time.
2. The service (``python -m vit_consumer ... serve``, a real uvicorn process):
   req/s and p50/p90/p99 at each ``--clients`` level and ``--protocols`` entry:
   ``predict`` posts each real JPEG file as ``image/jpeg``; ``v2`` posts its
   decoded pixels to the Open Inference Protocol's ``infer`` as a binary tensor
   (``Inference-Header-Content-Length``), asking for binary probabilities, as
   ``tritonclient`` does. The load generator is a lean asyncio HTTP/1.1 client
   (keep-alive, requests prepared beforehand); it shares the CPU with the
   service, so its CPU use is reported beside the service's.
3. The ratios the targets are stated in: service req/s at the highest client
   count over engine img/s at the batch size, per protocol; p50 at one client
   minus (engine batch-1 latency + decode); and the floor Little's law puts under
   the mean latency of N clients that each wait for their answer: N / (engine img/s).

Side by side: ``--rounds`` rounds, each timing the engine, the decoder, every
client level and the engine at the service's batch size again (the reference
of a round is both timings together, so it brackets the levels), so a shared
VM's drift hits both sides alike; latencies are
pooled over the rounds, the per-round figures kept in the report. Bounded:
``--seconds`` per level and round (and ``--max-requests``). Writes ``--output``
(JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

SPIN_ORDER = ["always", "run", "never"]  # ``serve --spin`` modes; "always" is ONNX Runtime's default


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_images(args) -> list[bytes]:
    """JPEG/PNG files of a folder, or the CIFAR-100 test images of an archive written as JPEGs."""
    if args.images:
        files = sorted(
            p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        )
        if not files:
            sys.exit(f"Error: no .jpg/.jpeg/.png files under {args.images}")
        return [p.read_bytes() for p in files[: args.num_images]]
    from PIL import Image

    from vit_pipeline.data import read_cifar100  # the restricted unpickler; only for --cifar

    x_test = read_cifar100(args.cifar)[2][: args.num_images]
    out = []
    for image in x_test:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def time_engine(run, batch: np.ndarray, seconds: float, workers: int = 1) -> tuple[list[float], float]:
    """Warm up, then time ``run(batch)`` for ``seconds``: (per-call latencies, wall seconds).

    ``workers`` threads call it at once (an engine that runs that many requests at once: OpenVINO's
    streams, as the service runs it); the latencies are every call's, the wall time theirs together.
    """
    from vit_consumer.candidates import time_calls

    return time_calls(run, batch, seconds, workers, warm_up=3, min_calls=5)


def pooled(rounds: list[tuple[list[float], float]]) -> list[float]:
    """The latencies of all rounds of ``time_engine`` together."""
    return [x for lat, _ in rounds for x in lat]


def engine_summary(batch: int, lat: list[float], wall: float) -> dict:
    return {"batch": batch, "images_per_s": batch * len(lat) / wall, "p50_ms": percentile(lat, 50) * 1e3,
            "mean_ms": float(np.mean(lat)) * 1e3, "calls": len(lat)}  # fmt: skip


def decode_ms(clf, payloads: list[bytes]) -> float:
    for p in payloads[:8]:
        clf.decode_image(p)
    start = time.perf_counter()
    for p in payloads:
        clf.decode_image(p)
    return (time.perf_counter() - start) / len(payloads) * 1e3


def request_bytes(port: int, body: bytes) -> bytes:
    head = (f"POST /predict?top_k=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")  # fmt: skip
    return head.encode() + body


def v2_request_bytes(port: int, model: str, input_name: str, pixels: np.ndarray) -> bytes:
    """An Open Inference Protocol ``infer`` request with one image as a binary FP32 tensor (as tritonclient sends)."""
    tensor = np.ascontiguousarray(pixels[None], np.float32).tobytes()
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": [1, *pixels.shape], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(tensor)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(header) + len(tensor)}\r\nConnection: keep-alive\r\n\r\n")  # fmt: skip
    return head.encode() + header + tensor


async def client(
    port: int, requests: list[bytes], stop_at: float, budget: list[int], out: list, errors: list
):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            payload = requests[i % len(requests)]
            i += 1
            t = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status == 200:
                out.append(time.perf_counter() - t)
            else:
                errors.append(status)
    finally:
        writer.close()


async def load_level(
    port: int, requests: list[bytes], clients: int, seconds: float, max_requests: int, snapshot
) -> dict:
    """``clients`` closed-loop clients for ``seconds`` after a short warm-up: latencies and CPU.

    ``snapshot()`` runs between the warm-up and the measurement (no request in
    flight then); its value is returned as ``before``.
    """
    warm_stop = time.perf_counter() + min(1.0, seconds / 4)
    await asyncio.gather(*(client(port, requests, warm_stop, [10**9], [], []) for _ in range(clients)))
    before = snapshot()
    lat: list[float] = []
    errors: list[int] = []
    budget = [max_requests]
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(client(port, requests, stop_at, budget, lat, errors) for _ in range(clients)))
    return {"latencies": lat, "errors": errors, "seconds": time.perf_counter() - t0,
            "loadgen_cpu": time.process_time() - cpu0, "before": before}  # fmt: skip


def level_summary(clients: int, rounds: list[dict]) -> dict:
    """One client level over all rounds: pooled latencies, req/s, CPU, mean batch, per-round figures."""
    lat = [x for r in rounds for x in r["latencies"]]
    total = {k: sum(r[k] for r in rounds) for k in ("seconds", "loadgen_cpu", "service_cpu", "service_wall",
                                                    *SERVICE_COUNTERS)}  # fmt: skip
    batches, handled = max(total["batches"], 1), max(total["handled"], 1)
    return {"clients": clients, "requests": len(lat), "errors": sum(len(r["errors"]) for r in rounds),
            "seconds": total["seconds"], "req_per_s": len(lat) / total["seconds"],
            "p50_ms": percentile(lat, 50) * 1e3, "p90_ms": percentile(lat, 90) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "loadgen_cpu_cores": total["loadgen_cpu"] / total["seconds"],
            "service_cpu_cores": total["service_cpu"] / total["service_wall"],
            "mean_batch_size": total["images"] / batches,
            "compute_ms_per_batch": total["compute_seconds"] * 1e3 / batches,
            # Means per request, from the service's own histograms.
            "service_ms_per_request": {part: total[f"{part}_seconds"] * 1e3 / handled for part in ("handler", "decode")},
            "client_mean_ms": float(np.mean(lat)) * 1e3 if lat else float("nan"),
            "service_requests": int(total["handled"]),  # the service's count of the same window
            "per_round": [{"requests": len(r["latencies"]), "req_per_s": len(r["latencies"]) / r["seconds"],
                           "p50_ms": percentile(r["latencies"], 50) * 1e3,
                           "p99_ms": percentile(r["latencies"], 99) * 1e3} for r in rounds]}  # fmt: skip


# A level's figure <- the service's /metrics counter it is the growth of.
SERVICE_COUNTERS = {
    "images": "vit_consumer_batch_size_sum",
    "batches": "vit_consumer_batch_size_count",
    "compute_seconds": "vit_consumer_compute_seconds_sum",
    "decode_seconds": "vit_consumer_decode_seconds_sum",
    "handler_seconds": "vit_consumer_request_latency_seconds_sum",
    "handled": "vit_consumer_request_latency_seconds_count",
}


def service_counters(url: str) -> dict[str, float]:
    """Images run, session.run calls, decode and handler seconds so far, from the service's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {
        line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line and line[0] != "#"
    }
    return {field: values.get(metric, 0.0) for field, metric in SERVICE_COUNTERS.items()}


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"Error: the service exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"Error: {url} was not ready within {timeout:g} s")


def environment() -> dict:
    import onnxruntime as ort

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from vit_consumer.engines import openvino_available

    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = sorted(
        f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx_vnni")) or f == "avx2"
    )
    ok, openvino = openvino_available()
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "python": platform.python_version(),
            "onnxruntime": ort.__version__, "openvino": openvino if ok else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def markdown(report: dict) -> str:
    e1, eb = report["engine"]
    served = report["served"]
    lines = [f"Served: `{served['file']}` on {served['engine']} ({served['precision']}), as the service's /health "
             "says; the engine alone is the same engine on the same file.", "",
             "| protocol | clients | req/s | p50 ms | p90 ms | p99 ms | mean batch | engine ms/batch | errors | "
             "load generator CPU (cores) | service CPU (cores) |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["service"]:
        lines.append(f"| {r['protocol']} | {r['clients']} | {r['req_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch_size']:.1f} | {r['compute_ms_per_batch']:.1f} | {r['errors']} | "
                     f"{r['loadgen_cpu_cores']:.2f} | {r['service_cpu_cores']:.2f} |")  # fmt: skip
    lines += ["", f"Engine alone: {e1['images_per_s']:.0f} img/s at batch 1 (p50 {e1['p50_ms']:.2f} ms), "
              f"{eb['images_per_s']:.0f} img/s at batch {eb['batch']}; JPEG decode {report['decode_ms']:.3f} ms/image "
              f"({report['settings']['rounds']} rounds side by side, latencies pooled). Batch-1 p50 by `--spin`: "
              + (", ".join(f"{mode} {ms:.2f} ms" for mode, ms in report["engine_b1_p50_ms_by_spin"].items()) or "-") + ".",
              ""] + [f"- {line}" for line in report["ratios"]]  # fmt: skip
    return "\n".join(lines)


def ratios(engine: list[dict], decode: float, decodes: list[float], levels: list[dict]) -> list[str]:
    """The figures the targets are stated in (deploy/consumer/README.md), per protocol: pooled, then per round."""
    (e1, eb) = engine

    def each(values: list[float], fmt: str) -> str:
        return f"per round {', '.join(format(v, fmt) for v in values)} (median {format(float(np.median(values)), fmt)})"

    out = []
    at_once = f" ({eb['parallel']} requests at once)" if eb.get("parallel", 1) > 1 else ""
    for protocol in dict.fromkeys(r["protocol"] for r in levels):
        mine = [r for r in levels if r["protocol"] == protocol]
        top, one = max(mine, key=lambda r: r["clients"]), min(mine, key=lambda r: r["clients"])
        # /predict decodes a JPEG per image; a v2 binary tensor is pixels already.
        dec, decs = (decode, decodes) if protocol == "predict" else (0.0, [0.0] * len(decodes))
        speed = [
            s["req_per_s"] / e["images_per_s"] for s, e in zip(top["per_round"], eb["per_round"], strict=True)
        ]
        gaps = [
            s["p50_ms"] - e["p50_ms"] - d
            for s, e, d in zip(one["per_round"], e1["per_round"], decs, strict=True)
        ]
        out += [
            f"{protocol}: service at {top['clients']} clients / engine at batch {eb['batch']}{at_once}: "
            f"{top['req_per_s'] / eb['images_per_s']:.2f}x ({top['req_per_s']:.0f} vs {eb['images_per_s']:.0f} img/s); "
            + each(speed, ".2f"),
            f"{protocol}: p99 at {top['clients']} clients: {top['p99_ms']:.1f} ms; floor under the mean latency of "
            f"{top['clients']} waiting clients (Little's law, a server as fast as the engine alone at batch "
            f"{eb['batch']}): {top['clients'] / eb['images_per_s'] * 1e3:.0f} ms",
            f"{protocol}: p50 at {one['clients']} client - (engine batch-1 p50 + decode): "
            f"{one['p50_ms'] - e1['p50_ms'] - dec:+.2f} ms ({one['p50_ms']:.2f} vs {e1['p50_ms']:.2f} + {dec:.3f}); "
            + each(gaps, "+.2f")
            + f"; the engine in the service over the engine alone (means): "
            f"{one['compute_ms_per_batch'] - e1['mean_ms']:+.2f} ms ({one['compute_ms_per_batch']:.2f} vs {e1['mean_ms']:.2f})",
            f"{protocol}: " + breakdown(one, e1, dec),
        ]  # fmt: skip
    return out


def breakdown(one: dict, e1: dict, decode: float) -> str:
    """Where a lone request's time goes (means): the client's view, the service's handler and its parts."""
    handler, decoding = one["service_ms_per_request"]["handler"], one["service_ms_per_request"]["decode"]
    compute = one["compute_ms_per_batch"]
    return (
        f"at {one['clients']} client, means: {one['client_mean_ms']:.2f} ms at the client = "
        f"{one['client_mean_ms'] - handler:.2f} HTTP (both ends) + {handler:.2f} in the service's handler: "
        f"decode {decoding:.2f} (warm loop {decode:.2f}), engine {compute:.2f} (engine alone {e1['mean_ms']:.2f}), "
        f"hand-offs and the rest {handler - decoding - compute:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the .onnx file to serve (e.g. the champion's)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of real JPEG/PNG files")
    src.add_argument("--cifar", help="a cifar-100-python archive/folder: its test images, written as JPEGs")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--protocols", default="predict,v2",
                        help="predict (JPEG files to /predict) and/or v2 (binary tensors to the v2 infer)")  # fmt: skip
    parser.add_argument("--engine", default="auto",
                        help="the service's --engine (auto: the fastest that passes the gate here)")  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of engine + every client level, side by side"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measured seconds per client level and round"
    )
    parser.add_argument("--max-requests", type=int, default=20000, help="per client level and round")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--engine-seconds", type=float, default=1.5, help="per batch size and round")
    parser.add_argument("--serve-option", action="append", default=[],
                        help="extra option for `serve`, e.g. --serve-option=--decode-threads=1 (repeatable)")  # fmt: skip
    parser.add_argument("--output", default="deploy/consumer/bench.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if (
        args.rounds < 1
        or not clients
        or min(clients) < 1
        or not set(protocols) <= {"predict", "v2"}
        or not protocols
    ):
        sys.exit(f"Error: expected --rounds >= 1, client counts >= 1 and protocols among predict, v2. Received: "
                 f"--rounds {args.rounds} --clients {args.clients} --protocols {args.protocols}")  # fmt: skip

    from vit_consumer.classifier import OnnxClassifier, resolve_model
    from vit_consumer.contract import REGISTERED_DIR
    from vit_consumer.engines import ONNXRUNTIME, parse_spec
    from vit_consumer.v2 import model_name

    payloads = load_images(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vit_consumer", "--model", args.model, "--providers", "CPUExecutionProvider",
           "--engine", args.engine, "serve", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--max-queue-delay-ms", str(args.max_queue_delay_ms), *args.serve_option]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    batches = (1, args.max_batch_size)
    engine_bn: list = []  # per round (latencies, wall) at the service's batch size; batch 1: spin "always"
    decodes: list[float] = []
    spin_rounds: dict[str, list] = {}
    parallel = 1  # requests the served engine runs at once (its /health says)
    service_rounds: dict[tuple[str, int], list] = {(p, c): [] for p in protocols for c in clients}
    try:
        wait_ready(url, proc)
        # The engine alone is the one the service chose (file, engine, precision), with its engine's defaults.
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            health = json.load(resp)
        registered = resolve_model(args.model)
        file = (
            registered
            if health["file"] == registered.name
            else registered.parent / REGISTERED_DIR / health["file"]
        )
        engine_name, precision = parse_spec(health["candidate"].get("engine", health["engine"]))
        # OpenVINO's streams: the engine alone is timed as the service runs it.
        parallel = int(health.get("parallel_requests", 1))
        clf = OnnxClassifier(file, ["CPUExecutionProvider"], source=args.model, engine=engine_name,
                             precision=precision, streams=parallel)  # fmt: skip
        served = {"file": str(file), "engine": clf.engine, "precision": clf.runtime.precision,
                  "parallel_requests": clf.runtime.parallel, "candidate": health["candidate"]}  # fmt: skip
        # ONNX Runtime: the same file with the service's other ways for threads to wait (``serve --spin``), batch 1.
        modes = SPIN_ORDER if engine_name == ONNXRUNTIME else SPIN_ORDER[:1]
        sessions = {"always": clf} | {mode: OnnxClassifier(file, ["CPUExecutionProvider"], spin=mode)
                                      for mode in modes[1:]}  # fmt: skip
        spin_rounds = {mode: [] for mode in modes}
        decoded = np.stack([clf.decode_image(p) for p in payloads])
        requests = {"predict": [request_bytes(port, p) for p in payloads],
                    "v2": [v2_request_bytes(port, model_name(clf), clf.input_name, x) for x in decoded]}  # fmt: skip

        def snapshot():  # the service's CPU and counters over the measured window only (after the warm-up)
            return cpu_seconds(proc.pid), service_counters(url), time.perf_counter()

        # The load generator's own full garbage collections (60-100 ms here, with TensorFlow's modules loaded)
        # would stall every client at once and be read as the service's latency.
        gc.collect()
        gc.freeze()
        for r in range(args.rounds):
            # The service is idle (its threads asleep) while the engine is timed, and the reverse. At
            # batch 1 the three spin modes take turns (ONNX Runtime's default, "always", is the reference);
            # their order rotates, so none always follows the heaviest step.
            turn = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in turn:
                # A lone image: the service runs it on every core (run_alone, the same as run without streams).
                spin_rounds[mode].append(
                    time_engine(sessions[mode].run_alone, decoded[:1], args.engine_seconds)
                )
            before = time_engine(clf.run, decoded[: args.max_batch_size], args.engine_seconds, parallel)
            decodes.append(decode_ms(clf, payloads))
            for c in clients:
                for protocol in protocols:
                    level = asyncio.run(
                        load_level(port, requests[protocol], c, args.seconds, args.max_requests, snapshot)
                    )
                    cpu0, counters0, wall0 = level.pop("before")
                    level["service_cpu"] = cpu_seconds(proc.pid) - cpu0
                    level["service_wall"] = time.perf_counter() - wall0
                    level |= {k: v - counters0[k] for k, v in service_counters(url).items()}
                    service_rounds[(protocol, c)].append(level)
                    print(f"round {r + 1}/{args.rounds}, {protocol}, {c} clients: "
                          f"{len(level['latencies']) / level['seconds']:.0f} req/s, "
                          f"p50 {percentile(level['latencies'], 50) * 1e3:.1f} ms, errors {len(level['errors'])}",
                          file=sys.stderr)  # fmt: skip
            # Again after the levels: the reference brackets them (the VM's speed drifts within seconds).
            after = time_engine(clf.run, decoded[: args.max_batch_size], args.engine_seconds, parallel)
            engine_bn.append((before[0] + after[0], before[1] + after[1]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    engine = []
    for b, rounds, workers in zip(batches, (spin_rounds["always"], engine_bn), (1, parallel), strict=True):
        summary = engine_summary(b, pooled(rounds), sum(wall for _, wall in rounds))
        summary["per_round"] = [engine_summary(b, run, wall) for run, wall in rounds]
        engine.append({**summary, "parallel": workers})
    decode = float(np.median(decodes))
    spin = {mode: percentile(pooled(rounds), 50) * 1e3 for mode, rounds in spin_rounds.items()}
    levels = [{"protocol": p, **level_summary(c, service_rounds[(p, c)])} for p in protocols for c in clients]
    report = {"environment": environment(), "model": args.model, "images": len(payloads), "served": served,
              "settings": {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                           "rounds": args.rounds, "seconds": args.seconds, "engine_seconds": args.engine_seconds,
                           "serve_options": args.serve_option, "engine": args.engine, "protocols": protocols,
                           "command": " ".join(sys.argv)},
              "engine": engine, "engine_b1_p50_ms_by_spin": spin, "decode_ms": decode, "decode_ms_per_round": decodes, "service": levels,
              "ratios": ratios(engine, decode, decodes, levels)}  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

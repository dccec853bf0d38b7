"""``python -m vit_consumer serve|predict``: the consumer without TensorFlow."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path

from vit_consumer.classifier import SPIN_MODES, InputError, OnnxClassifier
from vit_consumer.contract import MAX_TOP_K
from vit_consumer.settings import Settings

# On SIGTERM, requests in flight get this long (then their connections close): inside Kubernetes' default 30 s
# grace period, where a stalled upload's --body-timeout (30 s) kept the process until it was SIGKILLed.
GRACEFUL_SHUTDOWN_S = 10

# The options before the subcommand (each takes a value); `vit-pipeline serve` moves them there.
GLOBAL_OPTIONS = ("--model", "--tracking-uri", "--providers", "--engine")


def _port(raw: str) -> int:
    """A TCP port (argparse refuses anything else in one line, before the model loads)."""
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535. Received: {raw!r}")
    return int(raw)


def _host(raw: str) -> str:
    """A host to listen on: a blank one listened on every interface (uvicorn's reading of ""), unasked."""
    if not raw.strip():
        raise argparse.ArgumentTypeError(
            "expected a host such as 127.0.0.1 (0.0.0.0 for every interface). Received: ''"
        )
    return raw


def _top_k(raw: str) -> int:
    """1 to MAX_TOP_K, as ``vit-pipeline predict`` takes it (0 or -1 answered one class without a word)."""
    if not raw.strip().lstrip("-").isdigit() or not 1 <= int(raw) <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_TOP_K}. Received: {raw!r}")
    return int(raw)


def _check_bindable(host: str, port: int) -> None:
    """Binds (and releases) ``host:port`` as uvicorn will: an unknown host or a port in use is one line and
    exit 1 before the model loads and its engines are timed (uvicorn would say it only after that)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(address)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"Cannot listen on {host}:{port}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    # Every default is the settings' value: VIT_* variables (and MLFLOW_TRACKING_URI) apply, options win.
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="vit-consumer", description=__doc__)
    parser.add_argument("--model", required=True, help="model.onnx, or models:/vit-cifar100@champion")
    parser.add_argument(
        "--tracking-uri", default=defaults.tracking_uri, help="MLflow tracking URI for models:/ URIs"
    )
    parser.add_argument("--providers", default=",".join(defaults.providers or ()) or None,
                        help="comma-separated ONNX Runtime providers")  # fmt: skip
    parser.add_argument("--engine", default=defaults.engine,
                        help="auto (the fastest engine that passes the agreement gate on this CPU), onnxruntime, "
                             "openvino (its default precision: bf16 on AMX) or openvino-f32")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", type=_host, default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface, said so; blank is refused)")  # fmt: skip
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--max-bytes", type=int, default=defaults.max_bytes, help="largest request body")
    serve.add_argument("--max-inflight-bytes", type=int, default=defaults.max_inflight_bytes,
                       help="all request bodies being handled at once (beyond: 503)")  # fmt: skip
    serve.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                       help="most images per session.run")  # fmt: skip
    serve.add_argument("--max-queue-delay-ms", type=float, default=defaults.max_queue_delay_ms,
                       help="longest a batch waits for requests already on their way (being decoded); with none, it runs at once")  # fmt: skip
    serve.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="requests waiting (beyond: 503)"
    )
    serve.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout_s,
        help="seconds per request once its body arrived (then 504)",
    )
    serve.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                       help="seconds a client may take to send its body (then 408)")  # fmt: skip
    serve.add_argument("--pixel-budget", type=int, default=defaults.pixel_budget,
                       help="decoded pixels of all images of one request together")  # fmt: skip
    serve.add_argument("--reload-seconds", type=float, default=defaults.reload_seconds,
                       help="check a models:/name@alias source this often and switch to new versions (0: off)")  # fmt: skip
    serve.add_argument("--allow-contract-change", action="store_true", default=defaults.allow_contract_change,
                       help="switch to a new version whose class names or input shape differ from the served "
                            "one's (default: keep serving it and say why in /health)")  # fmt: skip
    serve.add_argument("--decode-threads", type=int, default=defaults.decode_threads,
                       help="threads that read and decode request bodies")  # fmt: skip
    serve.add_argument("--spin", choices=SPIN_MODES, default=defaults.spin, nargs="?", const="always",
                       help="when ONNX Runtime's threads spin: only while a run is in progress (run), also between "
                            "runs (always, also a bare --spin: the CPU HTTP and decoding need), or never")  # fmt: skip
    serve.add_argument("--ov-streams", type=int, default=defaults.ov_streams,
                       help="OpenVINO's streams: requests run at once, each on its share of the cores (0: OpenVINO's "
                            "throughput choice for this CPU; 1: one request at a time on every core)")  # fmt: skip
    serve.add_argument("--no-choose", dest="choose", action="store_false", default=defaults.choose_candidate,
                       help="serve the registered file; do not time the registered candidates (int8, ...) here")  # fmt: skip
    predict = sub.add_parser("predict", help="classify image files")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--top-k", type=_top_k, default=5, help=f"classes per image (1-{MAX_TOP_K})")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # The serve options' defaults are the settings, VIT_* variables included: a bad one is one line.
        parser = _parser()
    except InputError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            _check_bindable(args.host, args.port)
        # The service keeps ONNX Runtime's threads from spinning between runs (Settings.spin).
        spin = args.spin if args.command == "serve" else "always"
        serving = args.command == "serve"
        choose_for = (1, args.max_batch_size) if serving and args.choose else None
        # Every setting is checked before the model loads (which can take a minute): a bad one is one line.
        settings = Settings(
            engine=args.engine, ov_streams=1, providers=args.providers
        )  # predict: one at a time
        if serving:
            settings = Settings(
                max_bytes=args.max_bytes, max_inflight_bytes=args.max_inflight_bytes,
                max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                max_queue=args.max_queue, timeout_s=args.timeout, body_timeout_s=args.body_timeout,
                pixel_budget=args.pixel_budget,
                reload_seconds=args.reload_seconds, tracking_uri=args.tracking_uri,
                allow_contract_change=args.allow_contract_change,
                providers=args.providers, spin=args.spin,
                decode_threads=args.decode_threads, choose_candidate=args.choose, engine=args.engine,
                ov_streams=args.ov_streams,
            )  # fmt: skip
        # Before the model loads (a download can take a minute): a mistyped path is one line at once.
        if missing := [str(path) for path in getattr(args, "images", []) if not path.is_file()]:
            raise InputError(f"Image file does not exist: {', '.join(missing)}")
        providers = list(settings.providers) if settings.providers else None
        clf = OnnxClassifier.from_uri(args.model, args.tracking_uri, providers, spin=spin, choose_for=choose_for,
                                      engine=settings.engine, streams=settings.ov_streams)  # fmt: skip
        if serving:
            import uvicorn

            from vit_consumer.http import GuardedHttpToolsProtocol
            from vit_consumer.server import create_app

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            print(f"Serving {clf.source} (version {clf.version}, file {clf.path.name}: {clf.candidate['reason']}) "
                  f"on {clf.engine} {clf.providers_used}", file=sys.stderr)  # fmt: skip
            uvicorn.run(create_app(clf, settings), host=args.host, port=args.port, log_level="warning",
                        access_log=False, http=GuardedHttpToolsProtocol,
                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)  # fmt: skip
            return 0
        for path in args.images:
            (preds,) = clf.predict(clf.decode_image(path.read_bytes())[None], args.top_k)
            print(json.dumps({"image": str(path), "predictions": preds}))
        return 0
    except InputError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

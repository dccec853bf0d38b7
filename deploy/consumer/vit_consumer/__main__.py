"""``python -m vit_consumer serve|predict``: the consumer without TensorFlow."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vit_consumer.classifier import InputError, OnnxClassifier


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-consumer", description=__doc__)
    parser.add_argument("--model", required=True, help="model.onnx, or models:/vit-cifar100@champion")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    parser.add_argument("--providers", default=None, help="comma-separated ONNX Runtime providers")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-bytes", type=int, default=8 * 2**20)
    predict = sub.add_parser("predict", help="classify image files")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--top-k", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    providers = args.providers.split(",") if args.providers else None
    try:
        clf = OnnxClassifier.from_uri(args.model, args.tracking_uri, providers)
        if args.command == "serve":
            import uvicorn

            from vit_consumer.server import create_app

            print(f"Serving {clf.source} on {clf.providers_used}", file=sys.stderr)
            uvicorn.run(create_app(clf, args.max_bytes), host=args.host, port=args.port, log_level="info")
            return 0
        for path in args.images:
            if not path.is_file():
                raise InputError(f"Image file does not exist: {path}")
            (preds,) = clf.predict(clf.decode_image(path.read_bytes())[None], args.top_k)
            print(json.dumps({"image": str(path), "predictions": preds}))
        return 0
    except InputError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

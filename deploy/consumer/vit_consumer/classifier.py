"""Load an exported ViT ONNX model and classify images or raw pixel arrays.

The model's contract is read from its ``metadata_props`` (written by
vit-pipeline's export): ``class_names`` and the input shape. Input is raw RGB
pixels 0-255, NHWC, float32; images of any size and mode are converted to RGB and
resized to the model's input size (bilinear, as the training pipeline does).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vit_consumer import contract, engines

log = logging.getLogger(__name__)

MAX_BATCH = 1024
DEFAULT_PIXEL_BUDGET = 16_000_000  # decoded source pixels per request, all images together
ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the PIL.Image.Transpose that makes the image upright (1: upright already).
EXIF_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                  7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip


class InputError(ValueError):
    """Bad input from a client; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")  # sources MLflow downloads (resolve_model)


def registry_target(uri: str) -> tuple[str, str] | None:
    """``(name, alias)`` for ``models:/name@alias``; None for any other URI."""
    if uri.startswith("models:/") and "@" in uri:
        name, _, alias = uri.removeprefix("models:/").partition("@")
        return name.strip("/"), alias
    return None


def _mlflow():
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InputError("Loading from the MLflow registry needs mlflow-skinny installed") from exc
    return mlflow


def _check_answers(uri: str, tracking_uri: str | None) -> None:
    """A store that is not there is one line, at once: a missing SQLite file (MLflow would create it, empty, and
    then find no such model), or a tracking server that is down (MLflow's client retries for minutes)."""
    from vit_consumer.mlflow_store import probe, sqlite_file

    where = tracking_uri or _mlflow().get_tracking_uri()
    if (database := sqlite_file(where)) is not None and not database.is_file():
        raise InputError(f"Could not read {uri}: no MLflow store at {where} (no such file); give --tracking-uri "
                         "or MLFLOW_TRACKING_URI")  # fmt: skip
    problem, outage = probe(where)
    if problem is None:
        return
    error = InputError(
        f"Could not read {uri}: the MLflow tracking server {where} does not answer ({problem})"
    )
    if outage:  # refused, timed out, a 5xx: mlflow_store.unavailable says so, a caller may try again
        raise error from ConnectionError(problem)
    raise error  # a wrong address or credentials: the same answer next time


def alias_version(uri: str, tracking_uri: str | None = None) -> str:
    """The version number that ``models:/name@alias`` points at right now."""
    name, alias = registry_target(uri)
    mlflow = _mlflow()
    _check_answers(uri, tracking_uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # MlflowException or a connection error
        where = tracking_uri or mlflow.get_tracking_uri()
        raise InputError(f"Could not read {uri} from MLflow at {where}: {exc}".splitlines()[0]) from exc


def resolve_model(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local ``.onnx`` path for a file, a directory, or an MLflow ``models:/`` / ``runs:/`` URI.

    Args:
        dst: The folder a registry URI's files are downloaded into (None: a new temporary folder of
            MLflow's, which nothing removes: a long-running caller passes its own and removes it).
    """
    if not uri.strip():  # Path("") is the working directory: it served whatever .onnx file lay under it
        raise InputError("Expected a model: a .onnx file, a folder holding model.onnx, or models:/name@alias. "
                         f"Received: {uri!r}")  # fmt: skip
    if uri.startswith(REGISTRY_SCHEMES):
        mlflow = _mlflow()
        from mlflow.exceptions import MlflowException

        from vit_consumer.mlflow_store import store_uris

        _check_answers(uri, tracking_uri)
        try:
            # models:/ URIs resolve through the *registry* URI, which download_artifacts'
            # tracking_uri argument does not set: both, for this call only.
            with store_uris(tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst and str(dst)))
        except (MlflowException, OSError) as exc:
            where = tracking_uri or mlflow.get_tracking_uri()
            raise InputError(f"Could not fetch {uri} from MLflow at {where}: {exc}".splitlines()[0]) from exc
    else:
        local = Path(uri)
    if local.is_dir():
        # The registered file is model.onnx at the top; extra_files/ holds other candidates.
        found = [local / "model.onnx"] if (local / "model.onnx").is_file() else sorted(local.glob("*.onnx"))
        found = found or sorted(p for p in local.rglob("*.onnx") if "extra_files" not in p.parts)
        if not found:
            raise InputError(f"No .onnx file under {local}")
        if len(found) > 1:  # the first of several, by name, is a guess: which model is served must be said
            shown = ", ".join(str(p.relative_to(local)) for p in found[:5])
            raise InputError(f"{len(found)} .onnx files under {local} and no model.onnx ({shown}"
                             f"{', ...' if len(found) > 5 else ''}): name the file")  # fmt: skip
        local = found[0]
    if not local.is_file():
        raise InputError(f"Model file does not exist: {local}")
    return local


SPIN_MODES = ("never", "run", "always")
# Before the modes, spinning was a yes/no setting (serve --spin, VIT_SPIN=1): yes was ``always``.
_LEGACY_SPIN = {True: "always", False: "never", "1": "always", "true": "always", "yes": "always", "on": "always",
                "0": "never", "false": "never", "no": "never", "off": "never"}  # fmt: skip


def spin_options(spin: str | bool) -> dict[str, str]:
    """ONNX Runtime session entries for how its worker threads wait for work.

    ``always`` (ONNX Runtime's default) spins between runs too: fastest for
    back-to-back calls in one process, but the spinning cores are taken from
    whatever else runs (a server's HTTP and decoding). ``run`` spins only while a
    run is in progress, so the threads meet quickly between the graph's parallel
    sections, and stops when the run ends (``session.force_spinning_stop``).
    ``never`` sleeps between sections too: each one pays a wake-up.
    """
    spin = _LEGACY_SPIN.get(spin.strip().lower() if isinstance(spin, str) else spin, spin)
    if spin not in SPIN_MODES:
        raise InputError(f"Expected spin to be one of {', '.join(SPIN_MODES)}. Received: spin={spin!r}")
    return {
        "session.intra_op.allow_spinning": "0" if spin == "never" else "1",
        "session.force_spinning_stop": "1" if spin == "run" else "0",
    }


class OnnxClassifier:
    """An inference engine on an exported file, plus the class names and input contract from its metadata.

    Args:
        path: A ``.onnx`` file.
        providers: ONNX Runtime execution providers to request; default CUDA (if the
            build has it) then CPU. ``providers_used`` says what really runs.
        engine: ``onnxruntime`` or ``openvino`` (``vit_consumer.engines``).
        precision: OpenVINO's precision, ``default`` (its choice: bf16 on AMX) or ``f32``.
        streams: OpenVINO's streams (``vit_consumer.engines.OpenVinoEngine``): 1 runs one request at a time.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list[str] | None = None,
        source: str | None = None,
        version: str | None = None,
        spin: str = "always",
        engine: str = engines.ONNXRUNTIME,
        precision: str = "default",
        streams: int = 1,
    ):
        self.path = Path(path)
        self.source = source or str(path)
        self.version = version  # the registry version, for models:/ sources
        self.candidate: dict[str, Any] = {"served": "registered"}  # which registered file serves, and why
        self.name = "registered"  # which registered file on which engine (``vit_consumer.candidates``)
        requested = list(providers) if providers else contract.default_providers()
        try:
            self.runtime = engines.load(self.path, engine, precision, requested, spin_options(spin), streams)
        except engines.EngineError as exc:
            raise InputError(str(exc)) from None
        self.providers_requested = requested if engine == engines.ONNXRUNTIME else []
        self.providers_used = list(self.runtime.providers_used)
        missing = [p for p in self.providers_requested if p not in self.providers_used]
        if missing:
            log.warning(
                "Requested providers %s are not usable here; running on %s", missing, self.providers_used
            )
        meta = self.runtime.metadata
        try:
            names = contract.class_names(meta)
        except ValueError as exc:
            raise InputError(f"{self.path}: {exc}") from None
        if names is None:
            raise InputError(f"{self.path} has no class_names metadata; was it exported by vit-pipeline?")
        # A file of others would answer every request with a 500.
        if problem := contract.io_problem(*self.runtime.io, len(names), self.runtime.dtypes):
            raise InputError(f"{self.path} is not an image classifier of the contract: {problem}")
        self.class_names: list[str] = names
        self.metadata = dict(meta)
        try:
            self.temperature = contract.temperature(meta)
        except ValueError as exc:
            raise InputError(f"{self.path}: {exc}") from None
        self.input_name = self.runtime.input_name
        self.output_name = self.runtime.output_name
        self.input_shape = self.runtime.input_shape  # (H, W, C)
        self.download_dir: Path | None = None  # the registry download the files came from (``discard_files``)

    def discard_files(self) -> None:
        """Removes the folder a registry URI was downloaded into: the engines read their files when they
        load, and a service that follows an alias would otherwise keep every version it served on disk."""
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)
            self.download_dir = None

    @property
    def engine(self) -> str:
        """``onnxruntime``, ``openvino`` or ``openvino-f32``: the engine setting this classifier runs."""
        return engines.spec_label(self.runtime.name, self.runtime.requested_precision)

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None, providers: list[str] | None = None,
                 spin: str = "always", choose_for: tuple[int, ...] | None = None, engine: str = "auto",
                 streams: int = 1):  # fmt: skip
        """Loads a file, or a registry URI; ``models:/name@alias`` is pinned to its current version.

        Args:
            choose_for: Batch sizes to time the registered serving candidates at
                (``vit_consumer.candidates``); the fastest on this machine that
                passes the agreement gate is returned, ``candidate`` says which and
                why. None: the registered file.
            engine: ``auto`` (ONNX Runtime serves the registered file; with
                ``choose_for``, OpenVINO's settings are candidates too where it is
                installed and the export registered gate images), or one engine
                setting (``onnxruntime``, ``openvino``, ``openvino-f32``).
            streams: OpenVINO's streams, for every OpenVINO setting (1: one request at a time).
        """
        registered = uri.startswith(REGISTRY_SCHEMES)
        download = Path(tempfile.mkdtemp(prefix="vit-consumer-model-")) if registered else None
        try:
            chosen = cls._pinned(uri, tracking_uri, download, providers, spin, choose_for, engine, streams)
        except BaseException:
            if download is not None:
                shutil.rmtree(download, ignore_errors=True)
            raise
        chosen.download_dir = download
        return chosen

    @classmethod
    def _pinned(cls, uri: str, tracking_uri: str | None, download: Path | None, providers: list[str] | None,
                spin: str, choose_for: tuple[int, ...] | None, engine: str, streams: int):  # fmt: skip
        """``from_uri`` with the files downloaded into ``download``: an alias pinned to its version, the
        registered file loaded, then (``choose_for``) the fastest candidate that passes the gate."""
        from vit_consumer.candidates import (
            AUTO,
            candidate_name,
            candidate_pool,
            choose,
            engine_settings,
            registered_gate,
        )

        try:
            settings = engine_settings(engine)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        version = None
        target = registry_target(uri)
        if target is not None:
            version = alias_version(uri, tracking_uri)
            path = resolve_model(f"models:/{target[0]}/{version}", tracking_uri, download)
        else:
            path = resolve_model(uri, tracking_uri, download)

        def load(file: Path, setting: tuple[str, str], name: str) -> OnnxClassifier:
            clf = cls(file, providers, source=uri, version=version, spin=spin, engine=setting[0],
                      precision=setting[1], streams=streams)  # fmt: skip
            clf.name = name
            return clf

        first = (engines.ONNXRUNTIME, "default") if engine == AUTO else settings[0]
        served = load(path, first, candidate_name("registered", *first))
        gate = registered_gate(path, served.input_shape)
        if first[0] != engines.ONNXRUNTIME and gate is not None:
            # Asked for by name, and still gated: bf16 (or this CPU's kernels) may not keep the answers.
            agreement = gate.agreement(served)
            if agreement < gate.min_agreement:
                raise InputError(
                    f"{served.name} agrees with Keras on {agreement:.2%} of the {len(gate.images)} registered "
                    f"test images, below the gate's {gate.min_agreement:.1%}: serve with another --engine"
                )
        if not choose_for:
            served.candidate = {"served": served.name, "engine": served.engine,
                                "precision": served.runtime.precision, "reason": "candidate choice off"}  # fmt: skip
            return served
        loaded, skipped = candidate_pool(path, served.name, settings, gate is not None, load)
        chosen, report = choose(served, loaded, choose_for, gate=gate, refused=skipped)
        chosen.candidate = report
        return chosen

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Runs zero images through the graph once per batch size (first-run allocations, kernel picks); with
        OpenVINO's streams, through the compilation a lone batch runs on (``run_alone``) too."""
        for n in batch_sizes:
            x = np.zeros((n, *self.input_shape), np.float32)
            self.run(x)
            if self.runtime.parallel > 1:
                self.run_alone(x)

    # ----------------------------------------------------------------- input
    def decode_image(self, payload: bytes) -> np.ndarray:
        """One image file's bytes (a user's own: no request budget) -> float32 (H, W, 3) at the model's input size."""
        return self.decode_images([payload], None)[0]

    def decode_images(
        self, payloads: list[bytes], pixel_budget: int | None = DEFAULT_PIXEL_BUDGET
    ) -> np.ndarray:
        """Image files (``contract.IMAGE_FORMATS``) -> float32 (N, H, W, 3), refusing before any decoding if the
        images together hold more than ``pixel_budget`` pixels (their headers say); None: what training reads,
        up to Pillow's own limit (a user's own files, ``predict``).

        Anything Pillow raises while it parses a client's bytes is that client's bad file (a 400): its
        decoders raise SyntaxError, struct.error, IndexError... on damaged files, not only OSError.
        """
        import warnings

        from PIL import Image, UnidentifiedImageError

        # The budget is counted from the headers below, before any decoding: Pillow's own process-wide limit is
        # left as it is (setting it warned past the budget of whichever call ran last and refused past twice it,
        # a larger --pixel-budget at 80 MP, and the training images decoded later in the same process).
        most = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses more when it opens a file
        if pixel_budget is None:
            pixel_budget = most
        h, w, _ = self.input_shape
        opened = []
        try:
            total = 0
            for i, payload in enumerate(payloads):
                where = f"image {i + 1} of {len(payloads)}: " if len(payloads) > 1 else ""
                try:  # reads the header only; only the plugins of the formats both sides read
                    with (
                        warnings.catch_warnings()
                    ):  # Pillow's warning past its limit: the budget decides here
                        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                        img = Image.open(io.BytesIO(payload), formats=contract.IMAGE_FORMATS)
                except UnidentifiedImageError:
                    raise InputError(f"Could not decode the image: {where}not an image file of a format read here "
                                     f"({', '.join(contract.IMAGE_FORMATS)})") from None  # fmt: skip
                opened.append(img)
                total += img.size[0] * img.size[1]
                if total > pixel_budget:
                    raise InputError(
                        f"The images hold more than {pixel_budget} pixels together (the per-request budget); "
                        "send smaller images or fewer per request",
                        413,
                    )
            out = np.empty((len(payloads), h, w, 3), np.float32)
            for i, img in enumerate(opened):
                rgb = to_rgb(img)
                if rgb.size != (w, h):
                    rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
                out[i] = np.asarray(rgb, dtype=np.float32)
            return out
        except InputError:
            raise
        except Image.DecompressionBombError:  # Pillow's own limit, before ours could count the pixels
            raise InputError(f"An image holds more than {min(pixel_budget, most)} pixels (the per-request budget, "
                             f"at most Pillow's limit of {most}); send smaller images", 413) from None  # fmt: skip
        except MemoryError:
            raise
        except Exception as exc:  # a damaged file (see the docstring)
            raise InputError(f"Could not decode the image: {_plain(exc)}") from exc
        finally:
            for img in opened:
                img.close()

    def check_array(self, array: Any) -> np.ndarray:
        """Validates raw pixels: shape [N, H, W, 3] or [H, W, 3], numeric, finite, 0-255."""
        arr = np.asarray(array)
        if arr.dtype.kind not in "iuf":  # numpy files timedelta64 under its integers: "m" is refused too
            raise InputError(f"Expected numeric pixel values. Received: dtype={arr.dtype}")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape:
            raise InputError(
                f"Expected shape [batch, {', '.join(map(str, self.input_shape))}] (raw RGB pixels, NHWC). "
                f"Received: shape={list(arr.shape)}"
            )
        if not 1 <= len(arr) <= MAX_BATCH:
            raise InputError(
                f"Expected 1 to {MAX_BATCH} images. Received: {len(arr)}", 413 if len(arr) else 400
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)  # copies only when needed
        peaks = arr.reshape(len(arr), -1).max(axis=1)
        if not np.isfinite(arr).all() or arr.min() < 0 or peaks.max() > 255:
            raise InputError("Expected raw pixel values in [0, 255]")
        _refuse_unit_scale(arr, peaks)
        return arr

    # ------------------------------------------------------------ inference
    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits of images that ``check_array`` already accepted (the batcher's call)."""
        return self.runtime.run(images)

    def run_alone(self, images: np.ndarray) -> np.ndarray:
        """``run`` for a batch that has the machine to itself: on every core (OpenVINO streams' lone batch)."""
        return self.runtime.run_alone(images)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.check_array(batch))

    def predict(self, batch: Any, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k classes with softmax probabilities for each image."""
        return self.top_k(self.logits(batch), top_k)

    def top_k(self, logits: np.ndarray, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k classes with softmax probabilities (at the file's calibrated temperature) for each row of logits."""
        return contract.top_k(logits, self.class_names, top_k, self.temperature)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "version": self.version,
            "num_classes": len(self.class_names),
            "input": {"name": self.input_name, "shape": ["batch", *self.input_shape], "dtype": "float32"},
            "engine": self.runtime.name,
            "precision": self.runtime.precision,
            "parallel_requests": self.runtime.parallel,  # OpenVINO's streams: batches that run at once
            "providers": self.providers_used,
            "candidate": self.candidate,
            "file": self.path.name,
            "dataset": self.metadata.get("dataset", ""),
            "test_accuracy": self.metadata.get("test_accuracy", ""),
            "temperature": self.temperature,
            "mlflow_run_id": self.metadata.get("mlflow_run_id", ""),
        }


def _refuse_unit_scale(arr: np.ndarray, peaks: np.ndarray) -> None:
    """Refuses an image whose pixels were scaled to 0-1, the usual float convention elsewhere.

    Read as 0-255 it is a black image, and the answer a confident wrong class with a 200.
    Only fractions below 1 tell it apart: an image of 0s and 1s may be 0-255 (near black)."""
    for i in np.flatnonzero(peaks <= 1.0):
        if (arr[i] != np.floor(arr[i])).any():
            raise InputError(
                f"Expected raw pixel values in [0, 255]. Received: image {i} has fractional values no higher "
                "than 1 (pixels scaled to 0-1?): multiply them by 255"
            )


def to_rgb(img: Any) -> Any:
    """A decoded image as 8-bit RGB, upright: as a viewer shows it.

    The EXIF orientation is applied (a phone's portrait JPEG is stored sideways), 16-bit greyscale
    is scaled to 8 bits (Pillow's ``convert`` would clip it at 255: a white image), and a float
    image in 0-1 to 0-255 (``convert`` would make it black).
    """
    from PIL import Image

    # The transpose of each EXIF orientation, as ImageOps.exif_transpose applies it; not exif_transpose
    # itself, which also writes the EXIF back out and fails on a mistyped tag a phone or editor left.
    # Read after the pixels are loaded: Pillow's TIFF reader (13 here) turns the image upright as it loads
    # and drops the tag, so the tag read before would turn it twice.
    img.load()
    turn = EXIF_TRANSPOSE.get(img.getexif().get(ORIENTATION, 1))
    if turn is not None:
        img = img.transpose(Image.Transpose[turn])
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        wide = np.nan_to_num(np.asarray(img, dtype=np.float64))
        # 16-bit integers span 0-65535; floats (a TIFF) conventionally 0-1, else they are taken as 0-255.
        scale = 1 / 257.0 if img.mode != "F" else (255.0 if wide.size and wide.max() <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _plain(exc: BaseException) -> str:
    """An exception's message for a client: one line, no Python object reprs."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)[:300]

"""MLflow model registry: register the served ONNX file, champion/challenger.

**What decides.** The accuracy of the file that will be served (the ONNX graph,
run in ONNX Runtime on the CPU) on the new run's *full* test split. Under
``better_or_equal`` (default) the current champion's ONNX file is downloaded and
evaluated on the *same* split in the same stage, and the new version becomes
champion when its top-1 is at least the champion's. Both figures are recorded as
version tags (``served_test_accuracy``, ``champion_test_accuracy_same_split``) and
run tags (``registry.*``). A champion trained on another dataset (``dataset``
tag, or other class names) is not comparable and is not replaced; a champion
that cannot be loaded or evaluated blocks promotion with the reason; it is never
replaced silently. ``always`` / ``never`` skip the comparison.

**Concurrency.** The nightly deployment, the monthly sweep and manual runs all
register under one name. Reading the champion, comparing and moving the alias
happen under ``registry_lock(name)``: an exclusive file lock under
``$VIT_PIPELINE_HOME/locks`` (every process on this host, and hosts sharing that
directory), and, when a Prefect API server is configured, a Prefect global
concurrency limit ``vit-registry-<name>`` with one slot (every host that talks
to that server). After moving the alias it is read back; if another writer got
in between, the stage fails instead of reporting a champion it does not hold.

**Faults.** Only "this registered model does not exist" or "it has no champion
alias" mean "no champion". Any other registry error fails the stage before the
alias is touched (``RegistryError``).

**Resumed runs.** A run registers one version per name: a run that already has
one (found by run id) reuses it, and one whose decision is recorded returns it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from vit_consumer.contract import INPUT_NAME, MANIFEST_NAME, OUTPUT_NAME, CandidatesManifest
from vit_consumer.contract import class_names as contract_class_names

from vit_pipeline import thresholds, tracking
from vit_pipeline.config import PipelineConfig
from vit_pipeline.errors import PipelineError
from vit_pipeline.fsutil import scratch_root

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext
    from vit_pipeline.robustness import Robustness

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 images -> logits

CHAMPION = "champion"
ONNX_ARTIFACT = "onnx-model"
LOCK_TIMEOUT_SECONDS = 900.0
WITHDRAW_LOCK_SECONDS = 30.0  # a stopping run does not wait long for the lock to undo its promotion
REPLACED = "replaced"  # version tag: the version this one's promotion replaced ("none": there was none)
REPLACED_BY = "replaced_by"  # version tag: the version that took the alias from this one


class RegistryError(PipelineError):
    """The registry could not be read or written reliably; the champion was not touched."""


class NoChampion(PipelineError):
    """No version holds the alias (yet): nothing to serve or measure, which is not a failure of the store."""

    def __init__(self, name: str, alias: str = CHAMPION):
        self.name, self.alias = name, alias
        super().__init__(f"No version of {name!r} holds the alias {alias!r} (yet)")

    def __reduce__(
        self,
    ):  # pickled (a task runner, a persisted result) it is rebuilt from its name, not its text
        return type(self), (self.name, self.alias)


@dataclass
class Registration:
    """The outcome of registering one model version."""

    name: str
    version: str
    model_uri: str
    promoted: bool
    reason: str
    champion_version: str | None
    served_test_accuracy: float | None = None
    champion_test_accuracy: float | None = None
    test_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome}

    @property
    def outcome(self) -> str:
        """The decision, and where the alias is now: a resumed run's promotion may have been replaced since
        (it said "champion" while a later version held the alias)."""
        if not self.promoted:
            return "not promoted"
        if self.champion_version == self.version:
            return "champion"
        return (
            f"promoted, since replaced by v{self.champion_version}" if self.champion_version else "promoted"
        )


@dataclass(frozen=True)
class TestSplit:
    """The images every candidate is judged on, and the classes they are labelled with."""

    images: np.ndarray  # or ShardedImages: indexed like an array
    labels: np.ndarray
    class_names: list[str]
    data_digest: str = ""  # the whole prepared dataset's, for the version tag

    @classmethod
    def from_splits(cls, splits) -> TestSplit:
        return cls(splits.x_test, splits.y_test, list(splits.class_names), splits.digest())

    @property
    def digest(self) -> str:
        """SHA-256 of the test images and labels: the same digest means the same split."""
        import hashlib

        from vit_pipeline.shards import update_bytes

        h = hashlib.sha256()
        update_bytes(h, self.images)  # shard by shard for a sharded split
        h.update(np.asarray(self.labels, np.int64).tobytes())
        return h.hexdigest()


def onnx_logits(path: str | Path, split: TestSplit, batch_size: int = 256) -> np.ndarray:
    """An ONNX file's logits on ``split`` (ONNX Runtime, CPU)."""
    return onnx_predict(path, batch_size)(split.images)


def onnx_predict(path: str | Path, batch_size: int = 256) -> Predict:
    """An ONNX file as a function of uint8 images to logits (one ONNX Runtime session, CPU)."""
    from vit_pipeline.export import ort_session, run_onnx

    session = ort_session(path)
    return lambda images: run_onnx(session, images, batch_size)


def onnx_class_names(path: str | Path) -> list[str] | None:
    """The ``class_names`` metadata of an exported file (None if it has none)."""
    return contract_class_names(_metadata(path))


def onnx_temperature(path: str | Path) -> float:
    """The softmax temperature an exported file serves its probabilities with (1 if it declares none)."""
    from vit_consumer.contract import temperature

    return temperature(_metadata(path))


def _metadata(path: str | Path) -> dict[str, str]:
    from vit_pipeline.export import ort_session

    return ort_session(path).get_modelmeta().custom_metadata_map


def current_champion(client, name: str, alias: str = CHAMPION):
    """The version holding ``alias``, or None when the model or the alias does not exist.

    An error from the alias read is taken for "no champion" only when the
    registered model, read afterwards, confirms it: the model does not exist
    (``RESOURCE_DOES_NOT_EXIST``) or it has no such alias.

    Raises:
        RegistryError: any other failure (server error, connection lost): the
            caller must not take it for "no champion".
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # MlflowException, or requests/urllib3 errors on a dropped connection
        first = exc
    problem = f"Cannot read the {alias!r} of {name!r} from the registry: {first}"
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(problem) from first
    except Exception:
        raise RegistryError(problem) from first
    if alias not in model.aliases:
        return None
    raise RegistryError(problem) from first


def champion_logits(
    champion, split: TestSplit, tracking_uri: str | None = None
) -> tuple[np.ndarray | None, str | None, Predict | None]:
    """The champion's ONNX file on the challenger's split: (logits, None, its predict function) or (None, why
    not, None).

    ``tracking_uri``: the store the champion is registered in. The download goes into a temporary
    folder removed after it (a nightly pipeline would otherwise keep a copy per registration); the predict
    function keeps the file's loaded session, for more images (``max_robustness_drop``): what fails there is
    not the champion's fault and is not caught here.
    """
    from vit_consumer.classifier import resolve_model

    try:
        with tempfile.TemporaryDirectory(prefix="vit-champion-", dir=scratch_root()) as download:
            path = resolve_model(f"models:/{champion.name}/{champion.version}", tracking_uri, download)
            names = onnx_class_names(path)
            if names is not None and names != split.class_names:
                return (None, f"champion v{champion.version} predicts other classes than this run's test split",
                        None)  # fmt: skip
            predict = onnx_predict(path)
            return predict(split.images), None, predict
    except Exception as exc:  # whatever breaks, the champion was not evaluated
        # An outage says nothing of the champion: no decision now, a retry decides.
        if tracking.unavailable(exc):
            raise RegistryError(f"Could not download champion v{champion.version} to compare with it "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); nothing was "
                                "decided: --resume decides once the store answers") from exc  # fmt: skip
        why = f"champion v{champion.version} could not be evaluated ({type(exc).__name__}: {exc})"
        return None, why[:1000], None


@dataclass
class Decision:
    """Whether a version becomes champion, why, and every threshold checked on the way."""

    promoted: bool
    reason: str
    champion_accuracy: float | None = None
    checks: list[thresholds.Check] = field(default_factory=list)
    evaluated: bool = True  # False: decided before the thresholds were looked at (blocked, policy, no change)
    unchecked: str = ""  # the change thresholds not compared, and why (no champion, policy, ...)
    # The candidate's top-1 and the number of test images of the comparison (those the champion did not train on).
    compared: tuple[float, int] | None = None

    def thresholds_outcome(self) -> str:
        """The ``gate.thresholds`` tag: what the thresholds said, or why they were not looked at."""
        if not self.evaluated:
            return f"not evaluated ({self.reason})"
        return thresholds.outcome(self.checks, self.unchecked)


@dataclass
class Against:
    """What the comparison with one champion version needs, measured once (before the registry lock: the
    download and the champion's inference, and the robustness passes, take minutes for a large model)."""

    version: str
    unseen: np.ndarray
    seen_note: str
    logits: np.ndarray | None
    problem: str | None  # the champion could not be evaluated: why
    own_recall: dict[str, tuple[float, int]] | None = None  # on its own test split, for max_label_shift
    own_recall_why: str = ""
    robustness: tuple[Robustness, Robustness] | None = None  # (the candidate's, the champion's)


def measure_against(cfg: PipelineConfig, split: TestSplit, champion, tracking_uri: str | None,
                    predict: Predict) -> Against:  # fmt: skip
    """The champion's side of ``decide``: the test images it did not train on, its logits, its own recall and
    both files' robustness (``predict``: the served file, for ``max_robustness_drop``).

    Raises:
        RegistryError: the store did not answer (nothing may be decided on an outage).
    """
    unseen, seen_note = _unseen_by(cfg, champion, split)
    champ, problem, champ_predict = champion_logits(champion, split, tracking_uri)
    against = Against(str(champion.version), unseen, seen_note, champ, problem)
    if champ is None:
        return against
    if cfg.max_label_shift is not None:
        against.own_recall, against.own_recall_why = _champion_recall(cfg, champion)
    if cfg.max_robustness_drop is not None and len(unseen):
        new, old = _robustness_of(cfg, split, unseen, [predict, champ_predict])
        against.robustness = (new, old)
    return against


def _measured(against: Against | None, champion) -> bool:
    """Whether ``against`` is the measurement of ``champion`` (a version, not None)."""
    return against is not None and against.version == str(champion.version)


def comparable(cfg: PipelineConfig, champion, version: str) -> bool:
    """Whether ``decide`` compares ``version`` with ``champion`` (and needs ``measure_against`` of it): the
    policy compares, there is a champion, another version, of this dataset (``decide``'s early exits)."""
    return (
        cfg.promotion_policy not in ("never", "always")
        and champion is not None
        and str(champion.version) != version
        and champion.tags.get("dataset") == cfg.dataset_tag
    )


def decide(cfg: PipelineConfig, logits: np.ndarray, split: TestSplit, champion, against: Against | None,
           temperature: float = 1.0, relative_robustness: float | None = None) -> Decision:  # fmt: skip
    """The promotion policy and thresholds (``vit_pipeline.thresholds``) applied to the served file's logits.

    ``against``: ``measure_against`` of ``champion``, wherever ``comparable`` says it is compared (else None);
    ``temperature``, ``relative_robustness``: as ``thresholds.value_checks`` takes them.
    """
    if cfg.promotion_policy == "never":
        return Decision(False, "policy 'never'", evaluated=False)
    checks = thresholds.value_checks(
        cfg, logits, split.labels, split.class_names, temperature, relative_robustness
    )

    def unchecked(why: str) -> str:
        return f"{', '.join(thresholds.change_names(cfg))} not checked ({why})"

    if cfg.promotion_policy == "always" or champion is None:
        why = "policy 'always'" if cfg.promotion_policy == "always" else "no champion yet"
        return _judged(
            why, checks, unchecked=unchecked(why if champion is not None else "no champion to compare with")
        )
    champ_dataset = champion.tags.get("dataset")
    if champ_dataset != cfg.dataset_tag:
        why = f"champion v{champion.version} was trained on {champ_dataset!r}, not {cfg.dataset_tag!r}"
        return Decision(False, why, None, checks, unchecked=unchecked(why))
    if not _measured(against, champion):
        raise ValueError(f"Expected measure_against of champion v{champion.version}. Received: "
                         f"{against and f'v{against.version}'}")  # fmt: skip
    unseen, seen_note, champ = against.unseen, against.seen_note, against.logits
    if champ is None:
        problem = against.problem
        return Decision(False, f"{problem}; not replaced", None, checks, unchecked=unchecked(problem))
    shift_unchecked = ""
    if cfg.max_label_shift is not None:
        own = against.own_recall
        if own is None:
            shift_unchecked = f"max_label_shift not checked ({against.own_recall_why})"
        else:  # the images it trained on and the others, each on its own: either may hold the relabelled ones
            seen = np.setdiff1d(np.arange(len(split.labels)), unseen)
            parts = [("test images it trained on", seen), ("test images it did not train on", unseen)]
            checks.append(
                thresholds.label_shift_check(cfg, champ, split.labels, split.class_names, own, parts)
            )
    if not len(unseen):  # no accuracy comparison; a label shift on the images it trained on is still said
        why = f"not comparable: {seen_note}"
        return Decision(
            False, f"{why}; not replaced{_failed_text(checks)}", None, checks, unchecked=unchecked(why)
        )
    logits, champ, labels = logits[unseen], champ[unseen], split.labels[unseen]
    checks += thresholds.change_checks(cfg, logits, champ, labels, split.class_names)
    if against.robustness is not None:
        checks.append(thresholds.robustness_change_check(cfg, *against.robustness))
    new_right, old_right = logits.argmax(1) == labels, champ.argmax(1) == labels
    new, old = float(np.mean(new_right)), float(np.mean(old_right))
    compare = ">=" if new >= old else "<"
    why = f"served top-1 {new:.4f} {compare} champion v{champion.version}'s {old:.4f} on the same " \
          f"{len(labels)} test images{seen_note}; {thresholds.paired_difference(new_right, old_right)}"  # fmt: skip
    decision = _judged(why, checks, old, unchecked=shift_unchecked)
    decision.compared = (new, len(labels))
    return decision


def _robustness_of(
    cfg: PipelineConfig, split: TestSplit, unseen: np.ndarray, predicts: list[Predict]
) -> list[Robustness]:
    """Each model's top-1 under the robustness stage's corruptions (same seeds) on up to ``robustness_images``
    of the test images the champion did not train on: the same corrupted images, made once, for every file."""
    from vit_pipeline.robustness import measure

    idx = unseen[: cfg.robustness_images]
    images, labels = np.asarray(split.images[idx]), split.labels[idx]
    return measure(predicts, images, labels, cfg.corruption_list, list(cfg.corruption_severities), cfg.seed)


def _champion_artifact(
    cfg: PipelineConfig, champion, path: str, read: Callable[[Path], Any]
) -> tuple[Any, str]:
    """``read`` of a file of the champion's run: (its value, "") or (None, why not: none, or unreadable)."""

    def outage(exc: BaseException) -> Exception:  # decides nothing, as in champion_logits
        return RegistryError(f"Could not download champion v{champion.version}'s {path} ({type(exc).__name__}); "
                             "nothing was decided: --resume decides once the store answers")  # fmt: skip

    return tracking.read_run_file(cfg, champion.run_id, path, read, outage)


def _unseen_by(cfg: PipelineConfig, champion, split: TestSplit) -> tuple[np.ndarray, str]:
    """The indices of ``split``'s images the champion did not train on (exact pixel copies), and a note.

    Another split seed or other data puts some of the champion's training images in this run's
    test split; on those the champion scores higher, so they are left out of the comparison.
    """
    from vit_pipeline.data_validation import SEEN_ARTIFACT, ImageHashes, byte_hashes

    everything = np.arange(len(split.labels))
    seen, why = _champion_artifact(cfg, champion, SEEN_ARTIFACT, ImageHashes.load)
    if seen is None:
        return everything, f" (champion v{champion.version}'s training images are unknown: {why})"
    digests = set(seen.digests())
    unseen = np.array([i for i, d in enumerate(byte_hashes(split.images)) if d not in digests], np.int64)
    partly = (
        "" if seen.complete else f"; champion v{champion.version}'s checkpoint's training images are unknown"
    )
    left = len(everything) - len(unseen)
    if not left:
        return everything, f" ({partly[2:]})" if partly else ""
    if not len(unseen):
        return (
            unseen,
            f"champion v{champion.version} trained on all {len(everything)} of this run's test images",
        )
    return unseen, (f" it did not train on ({left} of the {len(everything)} were in champion v{champion.version}'s "
                    f"training split and are left out{partly})")  # fmt: skip


def _champion_recall(cfg: PipelineConfig, champion) -> tuple[dict[str, tuple[float, int]] | None, str]:
    """The champion's recall and support per class on its own test split (its run's evaluation), or why not."""
    import csv

    def read(path: Path) -> dict[str, tuple[float, int]]:
        with open(path, newline="") as f:
            return {
                r["class_name"]: (float(r["recall"]), int(float(r["support"]))) for r in csv.DictReader(f)
            }

    return _champion_artifact(cfg, champion, "evaluation/per_class_accuracy.csv", read)


def _judged(why: str, checks: list[thresholds.Check], champion_accuracy: float | None = None,
            unchecked: str = "") -> Decision:  # fmt: skip
    failed = _failed_text(checks)
    return Decision(not failed, why + failed, champion_accuracy, checks, unchecked=unchecked)


def _failed_text(checks: list[thresholds.Check]) -> str:
    bad = thresholds.failed(checks)
    return "; failed " + "; ".join(f"{c.name} ({c.detail})" for c in bad) if bad else ""


@contextlib.contextmanager
def registry_lock(name: str, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Serialises the champion's read-compare-set for one registered model name (module docstring)."""
    with _file_lock(name, timeout), _prefect_limit(name, timeout):
        yield


def lock_path(name: str) -> Path:
    """The registry lock file of a registered model name."""
    from vit_pipeline.tracking import home

    # A readable part, and a digest that keeps names apart and the file name short (a 256-character model name
    # made a file name the file system refused).
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return home() / "locks" / f"registry-{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:64]}-{digest}.lock"


@contextlib.contextmanager
def _file_lock(name: str, timeout: float) -> Iterator[None]:
    import fcntl
    import time

    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"Another registration of {name!r} held {path} for {timeout:g} s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prefect_api_url() -> str | None:
    """The Prefect API server this process talks to (None: none, or a temporary one of its own)."""
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    url = get_current_settings().api.url
    return str(url) if url else None


@contextlib.contextmanager
def _prefect_limit(name: str, timeout: float) -> Iterator[None]:
    """A Prefect global concurrency limit of one slot, when a Prefect server is configured."""
    if prefect_api_url() is None:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    limit = f"vit-registry-{name}"
    # Create or accept that it exists: registrations racing here would collide in a read-then-create.
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    with concurrency(limit, occupy=1, timeout_seconds=timeout, strict=True):
        yield


def version_of_run(client, name: str, run_id: str):
    """The version of ``name`` that ``run_id`` already registered, if any (a resumed run)."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _candidate_files(path: str, manifest: CandidatesManifest) -> list[str]:
    """The manifest (at ``path``) and the files it names (all beside it): candidates, the serving gate."""
    folder = Path(path).parent
    gate = manifest.gate_file(folder)
    return [path, *(str(f) for f in manifest.files(folder).values()), *([str(gate)] if gate else [])]


def _log_and_register(cfg: PipelineConfig, run_id: str, onnx_path: str, example: np.ndarray,
                      extra_files: list[str]) -> str:  # fmt: skip
    """Logs the ONNX file to the run with MLflow's onnx flavour and registers it; returns the version.

    Serving candidates and their manifest (``extra_files``) travel inside the same
    logged model as ``extra_files/``, so ``models:/name@champion`` brings them along.
    """
    import mlflow

    from vit_pipeline.export import ort_session, quiet_onnxruntime, run_onnx

    example = example.astype(np.float32)
    outputs = run_onnx(ort_session(onnx_path), example, len(example))
    signature = mlflow.models.infer_signature({INPUT_NAME: example}, {OUTPUT_NAME: outputs})
    with quiet_onnxruntime():
        info = _log_onnx(cfg, run_id, onnx_path, signature, example, extra_files)
    return str(info.registered_model_version)


def _log_onnx(cfg: PipelineConfig, run_id: str, onnx_path: str, signature, example: np.ndarray,
              extra_files: list[str]):  # fmt: skip
    import mlflow.onnx
    import onnx
    import onnxruntime as ort

    from vit_pipeline.mlflow_models import log_model

    return log_model(
        cfg,
        run_id,
        mlflow.onnx,
        ONNX_ARTIFACT,
        onnx_model=onnx.load(onnx_path),
        signature=signature,
        input_example={INPUT_NAME: example},
        registered_model_name=cfg.resolved_model_name,
        # Weights inside the one file: consumers download just model.onnx.
        save_as_external_data=False,
        # The GPU build carries the CPU provider; never pull plain onnxruntime beside it.
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime-gpu=={ort.__version__}"],
        **({"extra_files": extra_files} if extra_files else {}),
    )


def _candidate_tags(manifest: CandidatesManifest | None) -> dict[str, str]:
    if manifest is None:
        return {}
    candidates = manifest.candidates
    tags = {"candidates": ",".join(candidates) or "none"}
    for name, c in candidates.items():
        tags[f"candidate.{name}.top1_agreement"] = f"{c['top1_agreement']:.6f}"
        tags[f"candidate.{name}.test_accuracy"] = f"{c['test_accuracy']:.6f}"
    if manifest.gate:
        tags["serving_gate_images"] = str(manifest.gate["images"])
    return tags


def _lineage_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """Where a fine-tuned model's first weights came from (``init.*`` run tags, see ``vit_pipeline.finetune``):
    ``models:/vit-cifar100/3`` on the run becomes the lineage of ``models:/vit-flowers/1``; and what each gate
    found (``gate.*`` run tags: data validation, drift, leakage, ...)."""
    return {k: v for k, v in run_tags.items() if k.startswith(("init.", "gate."))}


def blocking_gates(cfg: PipelineConfig, run_tags: dict[str, str]) -> list[str]:
    """The gates whose outcome (a ``gate.*`` run tag) keeps this version from becoming champion."""
    blocked = []
    drift = run_tags.get("gate.drift", "")
    if cfg.drift_blocks_promotion and drift.startswith("above"):
        blocked.append(f"data drift {drift}")
    lineage = run_tags.get("gate.lineage", "")
    if cfg.init_leakage_blocks_promotion and lineage.startswith("leaked"):
        blocked.append(f"test images its checkpoint trained on: {lineage.removeprefix('leaked: ')}")
    infra = run_tags.get("gate.infra_validation", "")
    if infra.startswith("failed"):
        blocked.append(f"infra validation {infra}")
    return blocked


def register_onnx(
    cfg: PipelineConfig,
    run_id: str,
    onnx_path: str,
    split: TestSplit,
    keras_test_accuracy: float | None = None,
    candidates: str | None = None,
) -> Registration:
    """Registers the served ONNX file under ``cfg.resolved_model_name`` and applies the policy.

    ``candidates`` is the export's manifest of other serving candidates (e.g.
    int8-static) that passed their agreement gate: they are registered inside
    the same version, with their figures as version tags.

    Raises:
        RegistryError: the registry failed while the champion was read or moved.
    """

    client = tracking.client(cfg)
    name = cfg.resolved_model_name
    from vit_pipeline.evaluate import scores

    manifest = CandidatesManifest.read(candidates) if candidates else None  # read once
    predict = onnx_predict(onnx_path)
    logits = predict(split.images)
    served = scores(logits, split.labels)
    existing = version_of_run(client, name, run_id)
    version = (
        str(existing.version)
        if existing
        else _log_and_register(
            cfg,
            run_id,
            onnx_path,
            split.images[:1],
            _candidate_files(candidates, manifest) if manifest else [],
        )
    )
    if existing is not None and "promotion" in existing.tags:  # a resumed run that had already decided
        log.info("Run %s already registered %s v%s (%s)", run_id, name, version, existing.tags["promotion"])
        return _recorded(client, name, existing)
    tags = {
        "served_test_accuracy": f"{served['top1']:.6f}",
        "served_test_top5_accuracy": f"{served['top5']:.6f}",
        "test_accuracy": f"{served['top1']:.6f}",
        "test_images": str(len(split.labels)),
        "test_split_digest": split.digest,
        "dataset": cfg.dataset_tag,
        "data_digest": split.data_digest,
        "mlflow_run_id": run_id,
        **({"keras_test_accuracy": f"{keras_test_accuracy:.6f}"} if keras_test_accuracy is not None else {}),
        **_candidate_tags(manifest),
        **_lineage_tags((run := client.get_run(run_id)).data.tags),
    }
    blockers = blocking_gates(cfg, run.data.tags)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if existing is not None and "withdrawn" in existing.tags:  # decided again now
        client.delete_model_version_tag(name, version, "withdrawn")
    uri = tracking.tracking_uri(cfg)
    # Read only where a threshold needs it: a blocked file's metadata may be what blocked it (infra validation).
    temperature = onnx_temperature(onnx_path) if cfg.max_test_ece is not None and not blockers else 1.0
    # The comparison's heavy part against the champion of now, before the lock: other registrations (and a
    # stopped run's withdrawal, which waits WITHDRAW_LOCK_SECONDS) are not held while it runs. Under the lock
    # it is used only if the champion is still that version.
    before = current_champion(client, name)
    against = (
        measure_against(cfg, split, before, uri, predict)
        if comparable(cfg, before, version) and not blockers
        else None
    )
    with registry_lock(name):
        champion = current_champion(client, name)
        # Test hook (default 0 s): holds the lock between reading the champion and moving the alias, so
        # that racing registrations in tests/code/test_registry.py would overlap here without the lock.
        time.sleep(float(os.environ.get("VIT_PIPELINE_REGISTRY_HOLD_SECONDS") or 0))
        if champion is not None and str(champion.version) == version:
            decision = Decision(True, "already the champion", served["top1"], evaluated=False)
        elif blockers:
            decision = Decision(False, f"blocked by {'; '.join(blockers)}", evaluated=False)
        else:
            if comparable(cfg, champion, version) and not _measured(against, champion):  # it moved since
                against = measure_against(cfg, split, champion, uri, predict)
            decision = decide(cfg, logits, split, champion, against, temperature,
                              run.data.metrics.get("robustness_relative_accuracy"))  # fmt: skip
        promoted, champ_acc = decision.promoted, decision.champion_accuracy
        previous = str(champion.version) if champion else None
        moved = promoted and previous != version
        if moved:  # what it replaced, first: what withdraw_stopped undoes if the run does not finish
            client.set_model_version_tag(name, version, REPLACED, previous or "none")
            _move_alias(client, name, version, champion)
    registration = Registration(name, version, f"models:/{name}/{version}", promoted, decision.reason,
                                version if promoted else previous, served["top1"], champ_acc,
                                len(split.labels))  # fmt: skip
    # A stop from here on (the decision's record, the stages after) withdraws the promotion as the run ends
    # (withdraw_stopped): the version's `replaced` tag, written before the alias moved, says what to undo.
    _record_decision(client, run_id, registration, decision, served)
    return registration


def _record_decision(client, run_id: str, registration: Registration, decision: Decision, served) -> None:
    """The decision's tags on the version and the run, its checks and the served figures."""
    name, version, reason, champ_acc = (registration.name, registration.version, registration.reason,
                                        registration.champion_test_accuracy)  # fmt: skip
    checks, gate, compared = decision.checks, decision.thresholds_outcome()[:5000], decision.compared
    outcome = "promoted" if registration.promoted else "not promoted"
    same_split = {}
    if champ_acc is not None:
        same_split["champion_test_accuracy_same_split"] = f"{champ_acc:.6f}"
    if compared is not None:  # both figures on the same images (those the champion did not train on)
        same_split["served_test_accuracy_same_split"] = f"{compared[0]:.6f}"
        same_split["compared_test_images"] = str(compared[1])
    for key, value in same_split.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, "promotion", f"{outcome}: {reason}")
    client.set_model_version_tag(name, version, "gate.thresholds", gate)  # recorded whatever it said
    run_tags = {"registry.model": f"{name}/{version}", "registry.decision": outcome, "registry.reason": reason,
                "registry.served_test_accuracy": f"{served['top1']:.6f}"}  # fmt: skip
    run_tags["gate.thresholds"] = gate
    run_tags |= {f"registry.{key}": value for key, value in same_split.items()}
    logger = tracking.RunLogger(client, run_id)
    logger.tags(run_tags)
    logger.dict({"checks": [c.to_dict() for c in checks], "outcome": gate}, "registry/thresholds.json")
    figures = {"served_test_accuracy": served["top1"], "served_test_top5_accuracy": served["top5"]}
    logger.metrics(figures)
    # Also on the version's logged model (its source, models:/m-...): logged before the decision.
    logger.model_metrics(client.get_model_version(name, version).source, figures)
    log.info("Registered %s v%s: %s (%s)", name, version, outcome, reason)


def withdraw_stopped(client, name: str | None, run_id: str, why: str) -> bool:
    """The promotion ``run_id`` made, withdrawn because the run is ending without finishing (``why``).

    Called for every run that ends FAILED or KILLED: by the run's lifecycle (``runs.lifecycle``), so no window
    between the alias moving and the run's end is left out (a stop in the model card, in the register task's
    own completion, or after the last stage all left a KILLED run's model champion), and by whatever ends the
    run of a dead owner (``runs.end_run``: the reaper, ``end-crashed-runs``), so a SIGKILL there leaves no
    champion either. It acts on the version of ``name`` (None: of every registered model the run registered a
    version of; a reaper knows no config) the run registered whose promotion moved the alias (its ``replaced``
    tag, written before the alias moves) and that is still recorded as promoted or still champion. Its own
    failure is logged, never raised in place of the run's end; it returns False then (True: nothing is left to
    withdraw), so that a reaper can leave the run to its next pass.
    """
    try:
        names = [name] if name is not None else sorted(
            {v.name for v in client.search_model_versions(f"run_id = '{run_id}'")}
        )  # fmt: skip
    except Exception as exc:
        log.warning("Could not look up the versions run %s registered (%s): if it promoted one, that version "
                    "may stay %s", run_id, exc, CHAMPION)  # fmt: skip
        return False
    done = True
    for each in names:
        try:
            _withdraw_if_promoted(client, each, run_id, why)
        except Exception as exc:
            done = False
            log.warning("Could not check or withdraw the promotion of run %s of %s (%s): if it promoted a "
                        "version, that version may stay %s", run_id, each, exc, CHAMPION)  # fmt: skip
    return done


def _withdraw_if_promoted(client, name: str, run_id: str, why: str) -> None:
    version = version_of_run(client, name, run_id)
    if version is None or REPLACED not in version.tags:
        return
    number = str(version.version)
    champion = current_champion(client, name)
    if not version.tags.get("promotion", "").startswith("promoted") and (
        champion is None or str(champion.version) != number
    ):
        return
    previous = None if version.tags[REPLACED] == "none" else version.tags[REPLACED]
    _withdraw(client, run_id, name, number, previous, f"its run stopped before its last stage ({why[:300]})")


def _withdraw(client, run_id: str, name: str, version: str, previous: str | None, why: str) -> None:
    """Undoes the promotion of ``version``: its decision is removed (a ``--resume`` decides again against the
    champion of then) and the alias, if it still names this version (a later champion stays), goes back to
    ``previous``, or to what that one replaced while it was withdrawn too (its run stopped as well), or
    nowhere (None).

    All under the registry lock, the record first: a lock not had changes nothing (the version stays
    champion and recorded as promoted, true together; the tags written before the lock said "withdrawn" of a
    version that still served).
    """
    with registry_lock(name, WITHDRAW_LOCK_SECONDS):
        if "promotion" in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, "promotion")
        client.set_model_version_tag(name, version, "withdrawn", why[:5000])
        tracking.RunLogger(client, run_id).tags(
            {"registry.decision": "withdrawn", "registry.reason": why[:5000]}
        )
        now = current_champion(client, name)
        if now is not None and str(now.version) == version:
            back = _last_standing(client, name, previous)
            if back is None:
                client.delete_registered_model_alias(name, CHAMPION)
            else:
                _move_alias(client, name, back, now)
    log.warning("Withdrew %s v%s from %s: %s", name, version, CHAMPION, why)


def _last_standing(client, name: str, version: str | None) -> str | None:
    """``version``, or, while it is withdrawn itself, the version its promotion replaced, and so on (None:
    none): v3 withdrawn after v2, which it replaced, was withdrawn already, goes back to v1, never to v2."""
    seen = set()
    while version is not None and version not in seen:
        seen.add(version)
        tags = client.get_model_version(name, version).tags
        if "withdrawn" not in tags:
            return version
        version = None if tags.get(REPLACED, "none") == "none" else tags[REPLACED]
    return None


def _move_alias(client, name: str, version: str, was) -> None:
    """Sets the champion alias and reads it back (inside the lock); the version it leaves (``was``, the champion
    the caller read under the lock) says by which one (``replaced_by``: its page still said "promoted" with
    nothing to tell it is not champion any more), and the one it names (again, after a withdrawal) loses that
    tag."""
    try:
        client.set_registered_model_alias(name, CHAMPION, version)
        now = current_champion(client, name)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"Could not move {name!r}@{CHAMPION} to v{version}: {exc}") from exc
    if now is None or str(now.version) != version:
        held = None if now is None else now.version
        raise RegistryError(f"{name!r}@{CHAMPION} is v{held} right after it was set to v{version}: "
                            "another writer moved it outside the registry lock")  # fmt: skip
    if was is not None and str(was.version) != version and "withdrawn" not in was.tags:  # (its own tag says)
        client.set_model_version_tag(name, str(was.version), REPLACED_BY, version)
    if REPLACED_BY in now.tags:
        client.delete_model_version_tag(name, version, REPLACED_BY)


def _recorded(client, name: str, version) -> Registration:
    """The Registration a previous attempt of this run recorded on its version."""
    champion = current_champion(client, name)
    decision, _, reason = version.tags["promotion"].partition(": ")
    served = version.tags.get("served_test_accuracy")
    champ = version.tags.get("champion_test_accuracy_same_split")
    return Registration(
        name, str(version.version), f"models:/{name}/{version.version}", decision == "promoted", reason,
        str(champion.version) if champion else None, float(served) if served else None,
        float(champ) if champ else None, int(version.tags.get("test_images", 0)),
    )  # fmt: skip


# --------------------------------------------------------------------- the stage
def run(ctx: StageContext, data_path: str, onnx_path: str, test_accuracy: float) -> Registration:
    """The register stage: registers the served file (with the candidates the export listed beside it);
    the champion policy judges it on the full test split."""
    from vit_pipeline.data import Splits

    split = TestSplit.from_splits(Splits.load(data_path))
    manifest = Path(onnx_path).parent / MANIFEST_NAME  # the export's, when it listed candidates
    return register_onnx(ctx.cfg, ctx.run_id, onnx_path, split, keras_test_accuracy=test_accuracy,
                         candidates=str(manifest) if manifest.is_file() else None)  # fmt: skip


@dataclass(frozen=True)
class Champion:
    """The registry version behind an alias and the run that produced it."""

    name: str
    version: str
    run_id: str
    test_accuracy: str | None
    dataset: str | None
    keras_model_uri: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def champion(model_name: str, alias: str = CHAMPION, tracking_uri: str | None = None) -> Champion:
    """Finds the version holding ``alias`` (runs of dead processes are reaped first).

    Raises:
        NoChampion: no version holds the alias (or the model does not exist).
        RegistryError: the registry could not be read.
    """
    from vit_pipeline import runs
    from vit_pipeline.config import make_config
    from vit_pipeline.train import KERAS_MODEL_TAG

    cfg = make_config("quickstart", {"tracking_uri": tracking_uri})
    client = tracking.client(cfg)
    runs.reap_once(cfg)
    version = current_champion(client, model_name, alias)
    if version is None:
        raise NoChampion(model_name, alias)
    tags = client.get_run(version.run_id).data.tags
    return Champion(model_name, str(version.version), version.run_id, version.tags.get("test_accuracy"),
                    version.tags.get("dataset"), tags.get(KERAS_MODEL_TAG, f"runs:/{version.run_id}/keras-model"))  # fmt: skip

"""The model-card stage (last): one page per registered version, from what the run recorded.

After Mitchell et al. (2019, "Model Cards for Model Reporting") and Google's Model Card
Toolkit (which the TFX pipelines use; it is tied to TensorFlow 2 protobufs and unmaintained,
so the sections are written here): intended use, data and its statistics, metrics overall
and per class, calibration, robustness, the thresholds and which held, export parity, infra
validation, the benchmark on the training machine, lineage, limitations.

Everything on the card is read back from the MLflow run (params, metrics, tags, the gates'
JSON and CSV artifacts), so ``card(client, run_id, name, version)`` writes the same page for
any version later. The card is logged as ``model_card/model_card.md`` and ``.html``; the
version's description is the card without the full per-class table (a registry description
holds at most ``DESCRIPTION_LIMIT`` characters; ``_within_limit`` says what gives way first), which
the MLflow UI renders on the version page.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vit_pipeline.fsutil import scratch_dir, write_text

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext
    from vit_pipeline.registry import Registration

DESCRIPTION_LIMIT = 5000  # MLflow's model_versions.description column
HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}
th{background:#f3f3f3}code{background:#f6f6f6;padding:0 .2rem}h1{font-size:1.6rem}h2{margin-top:1.6rem}"""


class RunRecord:
    """A run's params, metrics, tags and (optional) artifacts, read once."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        run = client.get_run(run_id)
        self.params, self.metrics, self.tags = run.data.params, run.data.metrics, run.data.tags
        self._dir = scratch_dir("vit-card-")  # removed when the process ends
        self._read: dict[str, Any] = {}

    def artifact(self, path: str) -> Path | None:
        try:
            return Path(self.client.download_artifacts(self.run_id, path, str(self._dir)))
        except Exception:  # an older run, or a stage that did not run: the card says so
            return None

    def json(self, path: str) -> Any:
        if path not in self._read:  # read once: several sections show parts of one file
            found = self.artifact(path)
            self._read[path] = json.loads(found.read_text()) if found else None
        return self._read[path]

    def csv(self, path: str) -> list[dict[str, str]]:
        found = self.artifact(path)
        return list(csv.DictReader(found.read_text().splitlines())) if found else []


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion ``p`` of ``n``."""
    from vit_pipeline.thresholds import wilson

    return wilson(p * n, n)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]  # fmt: skip


def _data_section(rec: RunRecord) -> list[str]:
    stats = rec.json("data/statistics.json")
    p = rec.params
    lines = ["## Data", "", f"Source `{p.get('data.source', '-')}`, content digest `{p.get('data.digest', '-')[:16]}`, "
             f"{p.get('data.num_classes', '-')} classes.", ""]  # fmt: skip
    if stats:
        rows = [[split, s["count"], min(s["class_counts"].values()), max(s["class_counts"].values()),
                 "x".join(map(str, s["image_shape"])), ", ".join(f"{v:.1f}" for v in s["channel_mean"]),
                 ", ".join(f"{v:.1f}" for v in s["channel_std"]), s["constant_images"]]
                for split, s in stats["splits"].items()]  # fmt: skip
        lines += _table(["split", "images", "fewest a class", "most a class", "shape", "RGB mean", "RGB std",
                         "constant images"], rows)  # fmt: skip
        if stats.get("source_files"):
            src = stats["source_files"]
            skipped = rec.params.get(
                "data.skipped_files"
            )  # what prepare could not decode (older runs: absent)
            left_out = (
                "unreadable: not recorded"
                if skipped is None
                else f"{skipped} unreadable, left out of every split"
            )
            if int(rec.params.get("data.unlabeled_files", 0)):  # images beside the class folders
                left_out += f"; {rec.params['data.unlabeled_files']} images in no class folder, left out"
            lines += [f"Source files: {src['files']} ({left_out}), modes from "
                      f"their headers {src['modes']}, smallest side {src['min_side']} px, "
                      f"median {src['median_width']:.0f}x{src['median_height']:.0f}.", ""]  # fmt: skip
    for gate, label in (("gate.data_validation", "Schema"), ("gate.drift", "Drift against the champion's data"),
                        ("gate.leakage", "Leakage")):  # fmt: skip
        lines.append(f"- **{label}:** {rec.tags.get(gate, 'not run')}")
    if "gate.lineage" in rec.tags:  # fine-tuned: what its checkpoint trained on, against this test split
        lines.append(f"- **The checkpoint's training images:** {rec.tags['gate.lineage']}")
    return [*lines, ""]


def _metrics_section(rec: RunRecord, registration: Registration) -> tuple[list[str], list[str]]:
    """The overall figures, and the full per-class table (kept apart: it is long)."""
    m = rec.metrics
    n = registration.test_images or int(float(rec.params.get("data.test_size", 0) or 0))
    served = registration.served_test_accuracy
    lines = ["## Metrics", ""]
    if served is not None and n:
        low, high = _wilson(served, n)
        lines.append(f"Served file (ONNX Runtime) on {n} test images: top-1 **{_pct(served)}** "
                     f"(95% interval {_pct(low)} to {_pct(high)}), top-5 {_pct(m.get('served_test_top5_accuracy'))}; "
                     f"Keras top-1 {_pct(m.get('test_accuracy'))}, best validation {_pct(m.get('best_val_accuracy'))}.")  # fmt: skip
    all_rows = rec.csv("evaluation/per_class_accuracy.csv")
    per_class = []
    tested = {r["class_name"]: int(float(r["support"] or 0)) > 0 for r in all_rows}  # 0: not evaluated
    rows = [r for r in all_rows if tested[r["class_name"]]]
    if rows:
        lines.append(_balance_line(rows, [name for name, has in tested.items() if not has]))
        ordered = sorted(rows, key=lambda r: float(r["recall"]))
        shown = ordered[:10]
        # Ten rows at recall 0 would hide how many more there are, and a class never predicted has no precision.
        zero = sum(float(r["recall"]) == 0 for r in rows)
        never = sum(r["precision"] in ("", "nan") for r in rows)
        counts = (f" {zero} of them have recall 0" if zero else "") + (
            f"{';' if zero else ''} {never} are never predicted (precision nan: undefined)" if never else ""
        )
        lines += ["", f"Lowest recall of {len(rows)} classes (the full table is in the run's "
                  f"`model_card/model_card.md`){':' if not counts else ';' + counts + ':'}", ""]  # fmt: skip
        lines += _class_table(shown)
        per_class = ["## Per class", "", *_class_table(all_rows)]
    return [*lines, ""], per_class


def _class_table(rows: list[dict[str, str]]) -> list[str]:
    return _table(["class", "test images", "recall", "precision", "F1"],
                  [[r["class_name"], r["support"], f"{float(r['recall']):.3f}", f"{float(r['precision']):.3f}",
                    f"{float(r['f1']):.3f}"] for r in rows])  # fmt: skip


def _balance_line(rows: list[dict[str, str]], untested: list[str]) -> str:
    """What top-1 hides on uneven classes: the mean recall, and what always answering the largest class scores."""
    support = [int(float(r["support"])) for r in rows]
    largest = max(range(len(rows)), key=lambda i: support[i])
    balanced = sum(float(r["recall"]) for r in rows) / len(rows)
    line = (f"Balanced accuracy (mean recall of the {len(rows)} classes with test images) {_pct(balanced)}; "
            f"always answering the largest class ({rows[largest]['class_name']!r}, {support[largest]} of "
            f"{sum(support)} test images) would score {_pct(support[largest] / sum(support))}.")  # fmt: skip
    if untested:
        shown = ", ".join(repr(name) for name in untested[:10])
        line += f" Not evaluated (no test image): {len(untested)} class(es), {shown}."
    return line


def _condition(rec: RunRecord, *flags: str) -> str:
    """Whether a threshold was a release condition of this version, in italics: set in the run's config *and*
    checked at registration (``registry/thresholds.json``: a blocked version, the policy 'never', a change
    threshold without a champion are not checked)."""
    shown = {f: f"`--{f.replace('_', '-')}`" for f in flags}
    set_ = {f: f"{shown[f][:-1]} {rec.params[f]}`" for f in flags if rec.params.get(f, "None") != "None"}
    checked = {c["name"]: c for c in (rec.json("registry/thresholds.json") or {}).get("checks", [])}
    ran = [f"{set_[f]}, {'held' if checked[f]['held'] else 'failed'}" for f in set_ if f in checked]
    if ran:
        return f"_A release condition: {'; '.join(ran)} (see Thresholds)._"
    if set_:
        return f"_Set ({', '.join(set_.values())}) but not checked for this version (see Thresholds)._"
    return f"_Recorded, not a release condition ({', '.join(shown.values())} would make it one)._"


def _calibration_and_robustness(rec: RunRecord) -> list[str]:
    m, t = rec.metrics, rec.tags
    lines = ["## Calibration", "", _condition(rec, "max_test_ece"), ""]
    if "temperature" in m:
        lines += [f"Temperature **{m['temperature']:.3f}** ({t.get('calibration.why', 'fitted on the validation split')}; "
                  f"applied by the consumer to the probabilities it returns): test ECE {m['test_ece']:.4f} -> {m['test_ece_calibrated']:.4f}, "
                  f"NLL {m['test_nll']:.4f} -> {m['test_nll_calibrated']:.4f} (the Keras model; the served file's ECE, "
                  "where a threshold judged it, is in Thresholds).", ""]  # fmt: skip
    else:
        lines += ["Not measured.", ""]
    lines += ["## Robustness", "", "The Keras model on corrupted test images. "
              + _condition(rec, "min_relative_robustness", "max_robustness_drop"), ""]  # fmt: skip
    robust = rec.csv("robustness/robustness.csv")
    if robust:
        names = list(dict.fromkeys(r["corruption"] for r in robust))
        severities = sorted({int(r["severity"]) for r in robust})
        cell = {(r["corruption"], int(r["severity"])): float(r["accuracy"]) for r in robust}
        lines += [t.get("gate.robustness", ""), ""]
        lines += _table(["corruption", *[f"severity {s}" for s in severities]],
                        [[name, *[_pct(cell.get((name, s))) for s in severities]] for name in names])  # fmt: skip
    else:
        lines += ["Not measured.", ""]
    return lines


def _release_checks(rec: RunRecord) -> list[str]:
    """The thresholds' table and the other checks; the decision itself is the card's first line."""
    m, t = rec.metrics, rec.tags
    lines = ["## Thresholds and release checks", ""]
    checks = rec.json("registry/thresholds.json")
    if checks and checks["checks"]:
        lines += _table(["threshold", "held", "figures"],
                        [[c["name"], _held(c), c["detail"]] for c in checks["checks"]])  # fmt: skip
    # The served file's own parity figures (the plain export's are parity_max_abs_diff, ...).
    served = t.get("export.serve_variant", "-")
    key = "parity" if f"parity_{served}_max_abs_diff" not in m else f"parity_{served}"
    lines += [f"- **Thresholds:** {t.get('gate.thresholds', 'not recorded')}",
              f"- **Export parity** of the served file, `{served}` (ONNX Runtime against Keras, at most "
              f"{rec.params.get('parity_images', '-')} test images): max |logit difference| "
              f"{m.get(f'{key}_max_abs_diff', float('nan')):.2e}, top-1 agreement {_pct(m.get(f'{key}_top1_agreement'))}; "
              f"candidates `{t.get('export.candidates', '-')}`",
              f"- **Infra validation:** {t.get('gate.infra_validation', 'not run')}", ""]  # fmt: skip
    return lines


def _benchmark_section(rec: RunRecord) -> list[str]:
    report = rec.json("benchmark/report.json")
    lines = ["## Speed on the training machine", ""]
    if not report:
        return [*lines, "Not measured.", ""]
    from vit_pipeline.benchmark.report import BenchmarkReport

    bench = BenchmarkReport.from_dict(report)
    env = bench.environment
    lines.append(f"CPU {env.get('cpu_model', '-')} x{env.get('cpu_count', '-')}; this machine would serve "
                 f"`{bench.shown_label(rec.tags.get('benchmark.served_choice')) or '-'}`.")  # fmt: skip
    rows = []
    for bs in sorted({r.batch_size for r in bench.results}):
        served = bench.served(bs)
        if served is not None:
            rows.append([bs, served.shown, f"{served.throughput_ips:.1f}", f"{served.latency_ms.mean:.2f}",
                         f"{served.latency_ms.p50:.2f}"])  # fmt: skip
    if rows:  # images/s is the batch over the mean latency: both shown, and the median beside them
        lines += [
            "",
            *_table(["batch", "served engine", "images/s", "mean latency (ms)", "p50 latency (ms)"], rows),
        ]
    return [*lines, ""]


def _held(check: dict[str, Any]) -> str:
    if not check.get("checked", True):  # nothing it applies to (thresholds.Check.checked)
        return "not checked"
    return "yes" if check["held"] else "**no**"


def _code_line(tags: dict[str, str]) -> str:
    """Which code trained it: the commit (``runs.source_tags``), else only the package version."""
    from vit_pipeline.runs import DIRTY, RESUMED_COMMIT

    commit = tags.get("mlflow.source.git.commit")
    if not commit:
        return f"- Code: vit-pipeline {tags.get('vit_pipeline.version', '-')} (not run from a git checkout)."
    branch = f" on `{tags['mlflow.source.git.branch']}`" if "mlflow.source.git.branch" in tags else ""
    edits = " with uncommitted edits" if tags.get(DIRTY) == "true" else ""
    resumed = f"; resumed by commit `{tags[RESUMED_COMMIT][:12]}`" if RESUMED_COMMIT in tags else ""
    return f"- Code: commit `{commit[:12]}`{branch}{edits}{resumed}."


def _lineage_and_limits(rec: RunRecord, registration: Registration) -> list[str]:
    t, m, p = rec.tags, rec.metrics, rec.params
    lines = ["## Lineage", ""]
    init = {k: v for k, v in t.items() if k.startswith("init.")}
    if init:
        lines += [f"- `{k}`: {v}" for k, v in sorted(init.items())]
    else:
        lines.append("- Trained from random weights.")
    lines += [f"- MLflow run `{rec.run_id}`, preset `{t.get('preset', p.get('preset', '-'))}`, "
              f"{p.get('epochs', '-')} epochs, seed {p.get('seed', '-')}.", _code_line(t), ""]  # fmt: skip
    lines += ["## Limitations", ""]
    n = registration.test_images
    if registration.served_test_accuracy is not None and n:
        low, high = _wilson(registration.served_test_accuracy, n)
        lines.append(
            f"- The test split holds {n} images: top-1 is known to about +/-{50 * (high - low):.1f} points."
        )
    calibrated = m.get("temperature", 1.0) != 1.0
    lines.append("- It always answers one of its classes, also for an image of none of them; its probabilities "
                 + ("were calibrated on data like its validation split, not on what it will be shown."
                    if calibrated else "are the softmax's, not calibrated (see Calibration)."))  # fmt: skip
    if "robustness_relative_accuracy" in m:
        lines.append(f"- Under common corruptions it keeps {_pct(m['robustness_relative_accuracy'])} of its clean "
                     "accuracy (mean over the robustness stage's corruptions and severities).")  # fmt: skip
    exact, near = int(m.get("data.test_exact_duplicates", 0)), int(m.get("data.test_near_duplicates", 0))
    if exact + near and not m.get("data.test_duplicates_dropped"):
        # A near pair is a perceptual-hash match: a copy (re-encoded, resized, brightened) or, on images with
        # little detail (upscaled 8x8 digits), a look-alike. Say which is which is known, and where to look.
        found = " and ".join(f for f in (f"{exact} are exact copies of training or validation images" if exact else "",
                                          f"{near} nearly match a training or validation image (perceptual hash)"
                                          if near else "") if f)  # fmt: skip
        lines.append(f"- Of its test images, {found}; they were kept. Copies make the test figures flatter it, "
                     "look-alikes need not (the pairs are in `data/leaked_pairs.png`).")  # fmt: skip
    if t.get("gate.drift", "").startswith("above"):
        lines.append("- Its training data drifted from the champion's (see Data).")
    return [*lines, ""]


def _decision_line(client, registration: Registration) -> str:
    """What was decided when the version was registered, dated: the card is not rewritten when the alias
    moves on, so it must not say "champion" in the present tense (the registry's alias says who is)."""
    import datetime

    try:
        ms = client.get_model_version(registration.name, registration.version).creation_timestamp
        when = f" ({datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC):%Y-%m-%d %H:%M} UTC)"
    except Exception:  # the card is still worth writing without the date
        when = ""
    decided = "promoted to champion" if registration.promoted else "not promoted"
    return (f"**Decision at registration{when}:** {decided}: {registration.reason}. Which version serves now: "
            f"the registry's `@champion` alias of `{registration.name}`.")  # fmt: skip


def card(client, run_id: str, registration: Registration) -> tuple[str, str]:
    """(the full card, the card for the version description) as Markdown."""
    rec = RunRecord(client, run_id)
    classes = rec.json("data/dataset.json") or {}
    names = classes.get("class_names", [])
    shape = classes.get("input_shape", [])
    head = [f"# Model card: {registration.name} v{registration.version}", "",
            _decision_line(client, registration), "",
            "## Intended use", "",
            f"Classifies {'x'.join(map(str, shape[:2])) or 'RGB'} RGB images (raw pixels 0-255) of the dataset "
            f"`{rec.tags.get('dataset', registration.name)}` into {len(names) or '-'} classes"
            f"{': ' + ', '.join(names[:20]) + (f' and {len(names) - 20} more' if len(names) > 20 else '') if names else ''}. "
            f"Served as ONNX by `deploy/consumer` (no TensorFlow); answers are the top-k classes with {_probabilities(rec)}. "
            "Not for images of other kinds or decisions no person reviews.", ""]  # fmt: skip
    metrics, per_class = _metrics_section(rec, registration)
    sections = {"head": head, "data": _data_section(rec), "metrics": metrics,
                "calibration": _calibration_and_robustness(rec), "checks": _release_checks(rec),
                "speed": _benchmark_section(rec), "lineage": _lineage_and_limits(rec, registration)}  # fmt: skip
    full = "\n".join([_join(sections), *per_class])
    return full, _within_limit(sections)


def _probabilities(rec: RunRecord) -> str:
    t = rec.metrics.get("temperature")
    if t is None:
        return "softmax probabilities (calibration not measured)"
    if t == 1.0:
        return "softmax probabilities (not rescaled: no temperature that generalised, see Calibration)"
    return f"probabilities calibrated on the validation split (temperature {t:.3f})"


# Shortened first, for the version description: the sections a registry reader needs least, each with the
# heading its pointer keeps.
SHORTENED_FIRST = {"speed": "## Speed on the training machine", "data": "## Data",
                   "calibration": "## Calibration and robustness"}  # fmt: skip


def _join(sections: dict[str, list[str]]) -> str:
    return "\n".join(line for lines in sections.values() for line in lines)


def _within_limit(sections: dict[str, list[str]]) -> str:
    """The card without the per-class table, within ``DESCRIPTION_LIMIT``: the ``SHORTENED_FIRST`` sections give
    way, in that order, to a pointer to the full card before anything is cut, and a cut still needed is made
    before the lineage and limitations, so they stay on the version page."""
    sections = dict(sections)
    for name, heading in SHORTENED_FIRST.items():
        if len(_join(sections)) <= DESCRIPTION_LIMIT:
            break
        sections[name] = [heading, "", "In the full card (the run's `model_card/model_card.md`).", ""]
    text = _join(sections)
    if (
        len(text) > DESCRIPTION_LIMIT
    ):  # still over (long failure details): cut before the lineage, not through it
        tail = _join({"lineage": sections.pop("lineage")})
        room = DESCRIPTION_LIMIT - len(tail) - 80
        text = (
            _join(sections)[:room].rsplit("\n", 1)[0] + "\n\n(cut: the whole card is in the run)\n\n" + tail
        )
    return text


def to_html(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip


# ------------------------------------------------------------------- the stage
def run(ctx: StageContext, registration: Registration) -> dict[str, str]:
    """Writes the card, logs it to the run and sets it as the version's description."""
    client = ctx.log.client
    full, short = card(client, ctx.run_id, registration)
    out = ctx.work_dir / "model_card"
    paths = {"markdown": write_text(out / "model_card.md", full),
             "html": write_text(out / "model_card.html", to_html(full, f"{registration.name} v{registration.version}"))}  # fmt: skip
    ctx.log.artifacts(paths.values(), "model_card")
    client.update_model_version(registration.name, registration.version, description=short)
    ctx.log.tags({"model_card": f"model_card/model_card.html ({registration.model_uri})"})
    return {k: str(v) for k, v in paths.items()}

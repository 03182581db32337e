"""The benchmark report: headline ratios, targets, one table row per artifact, plots.

`build_report` gathers the per-artifact records (bench.py) into one JSON-friendly dict; the Markdown
is rendered *from that dict* by `render_markdown`, so both always hold the same numbers. Plots:
accuracy against batch-1 latency with the Pareto front marked, the confusion matrices of the teacher
ensemble and the INT8 (cpu) student, and the label-fraction plot when `make experiment-fractions` ran.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.interleave import ratio_over_rounds
from deploy.contract import TaskSpec
from deploy.fileio import atomic_write, atomic_write_text
from deploy.markdown import table_head, table_lines, table_row
from train.layout import BENCH_REPORT
from train.metrics import points_label, primary_metric, to_points
from train.plots import plot_confusion_matrix, plt, save_figure
from train.summary_rules import summary_columns

RAN = ("passed", "below floor")  # statuses whose numbers exist
LATENCY_PREF = ("fp32", "pytorch")  # the format of the ensemble/student pair in ratios, by preference


def primary_metrics(tasks: Sequence[TaskSpec]) -> list[str]:
    """Each task's primary metric (train.metrics.primary_metric): what selects checkpoints and is guarded."""
    return [primary_metric(t) for t in tasks]


def pareto_front(xy: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (lower x = faster, higher y = more accurate)."""
    front = []
    for i, (x, y) in enumerate(xy):
        dominated = any(xj <= x and yj >= y and (xj < x or yj > y) for j, (xj, yj) in enumerate(xy) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: xy[i][0])


# --- headline and targets -------------------------------------------------------------------------
def _ran(records: list[dict], name: str) -> dict | None:
    return next((r for r in records if r["name"] == name and r["status"] in RAN), None)


def _pair(records: list[dict]) -> tuple[dict | None, dict | None]:
    """The ensemble and the student in the same format (ONNX FP32, else PyTorch), so a ratio never
    mixes runtimes; (None, None) when no format has both."""
    for flavour in LATENCY_PREF:
        ens, stu = _ran(records, f"ensemble.{flavour}"), _ran(records, f"student.{flavour}")
        if ens and stu:
            return ens, stu
    return None, None


def _ms(record: dict | None, batch: int = 1) -> float | None:
    stats = (record or {}).get("latency", {}).get(str(batch))
    return stats["per_image_ms"] if stats else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def latency_ratio(num: dict | None, den: dict | None, batch: int = 1) -> dict | None:
    """num/den latency at `batch`: the median of the per-round ratios with their spread (interleaved
    rounds, benchmarks/interleave.py); from the overall medians (rounds 1) when no rounds were recorded."""
    rounds = [((r or {}).get("latency", {}).get(str(batch)) or {}).get("rounds_ms") for r in (num, den)]
    if all(rounds):
        return ratio_over_rounds(*rounds)
    value = _ratio(_ms(num, batch), _ms(den, batch))
    return None if value is None else {"median": value, "min": value, "max": value, "rounds": 1}


def headline(records: list[dict], tasks: Sequence[TaskSpec]) -> dict:
    """Ratios measured in this run (same machine, runtime, threads and images): latency at batch 1
    ensemble/student and FP32/INT8 (also at the largest batch), and student/ensemble accuracy per primary
    metric. Each latency ratio is the median over interleaved rounds; `latency_spread` holds its spread."""
    (ens, stu), int8 = _pair(records), _ran(records, "student.int8-cpu")
    ens_onnx, stu_onnx = _ran(records, "ensemble.fp32"), _ran(records, "student.fp32")  # ORT, like INT8
    acc = {}
    for key in primary_metrics(tasks):
        s, e = (stu or {}).get("metrics", {}).get(key), (ens or {}).get("metrics", {}).get(key)
        acc[key] = _ratio(s, e)
    largest = max((int(b) for r in records for b in r.get("latency", {})), default=1)
    spread = {"latency_ensemble_over_student": latency_ratio(ens, stu),
              "latency_ensemble_over_student_int8": latency_ratio(ens_onnx, int8),
              "latency_fp32_over_int8_student": latency_ratio(stu_onnx, int8),
              "latency_fp32_over_int8_student_largest_batch": latency_ratio(stu_onnx, int8, largest)}
    split = (int8 or {}).get("encoder_decoder_ms") or {}
    spread["latency_int8_student_over_its_encoder"] = split.get("full_over_encoder")
    return {
        "compared": {"ensemble": ens and ens["name"], "student": stu and stu["name"],
                     "student_int8": int8 and int8["name"]},
        **{key: value and value["median"] for key, value in spread.items()},
        "largest_batch": largest,
        "latency_spread": spread,
        "accuracy_student_over_ensemble": acc,
    }


def _target(text: str, value: float | None, goal: float, higher: bool, unit: str, detail: str = "") -> dict:
    if value is None:
        return {"target": text, "status": "n/a", "value": None, "goal": goal, "margin": None, "unit": unit,
                "detail": f"not measured (needs {detail or 'INT8 and FP32 artifacts'})"}
    margin = value - goal if higher else goal - value
    return {"target": text, "status": "met" if margin >= 0 else "missed", "value": value, "goal": goal,
            "margin": margin, "unit": unit, "detail": detail}


def targets(records: list[dict], tasks: Sequence[TaskSpec]) -> list[dict]:
    """The project's targets, each met / missed (with the margin) / n/a. Reported, never asserted."""
    head = headline(records, tasks)
    ens, stu = _pair(records)
    out = [
        _target("INT8 (cpu) student >= 2x faster than FP32 student, batch 1", head["latency_fp32_over_int8_student"],
                2.0, True, "x", "student.fp32 vs student.int8-cpu (ONNX Runtime)"),
        _target(f"INT8 (cpu) student >= 2.5x faster than FP32 student, batch {head['largest_batch']}",
                head["latency_fp32_over_int8_student_largest_batch"], 2.5, True, "x",
                "student.fp32 vs student.int8-cpu (ONNX Runtime)"),
        _target("decoder: INT8 (cpu) student <= 2x its encoder-only latency, batch 1 (decoder costs <= encoder)",
                head["latency_int8_student_over_its_encoder"], 2.0, False, "x",
                "student.int8-cpu vs its encoder-only sub-model (ONNX Runtime)"),
        _target("student (INT8 cpu, as deployed) >= 50x lower latency than the teacher ensemble, batch 1",
                head["latency_ensemble_over_student_int8"], 50.0, True, "x",
                "ensemble.fp32 vs student.int8-cpu (ONNX Runtime); FP32 vs FP32: "
                + _num(head["latency_ensemble_over_student"], ".1f", "x")),
    ]
    worst, where = None, ""
    for r in records:
        if r["status"] not in RAN or not r["precision"].startswith("int8"):
            continue
        ref = _ran(records, f"{r['model']}.fp32")
        for key in primary_metrics(tasks) if ref else ():
            if key in r["metrics"] and key in ref["metrics"]:
                drop = to_points(key, ref["metrics"][key]) - to_points(key, r["metrics"][key])
                if worst is None or drop > worst:
                    worst, where = drop, f"worst: {r['name']} {key} ({drop:+.2f} points below FP32)"
    out.append(_target("every INT8 flavour within 1 point of FP32 on every task", worst, 1.0, False, "points",
                       where or "an INT8 artifact and its model's FP32 ONNX"))
    first = next((primary_metric(t) for t in tasks if t.kind == "classification"), None)
    gap = None
    if first and ens and stu and first in ens["metrics"] and first in stu["metrics"]:
        gap = to_points(first, ens["metrics"][first]) - to_points(first, stu["metrics"][first])
    pair = f"{stu['name']} vs {ens['name']}" if ens and stu else "student vs ensemble in one format"
    out.append(_target("KD student within 3 T1 points of the ensemble", gap, 3.0, False, "points",
                       f"{pair} on {first}"))
    return out


# --- Markdown -------------------------------------------------------------------------------------
def _images_line(settings: dict) -> str:
    """The whole split, or how the sample was drawn (so a reader knows why numbers may differ from summary.md)."""
    total = settings.get("test_split_images", settings["images"])
    if settings["images"] >= total:
        return f"all {total} images (the same images as summary.md)"
    return (f"{settings['images']} of {total} images, a random sample (seed {settings.get('sample_seed')}); "
            "summary.md scores the whole split")


def _num(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def metric_cell(key: str, value: float | None) -> str:
    """Accuracies in %, BLEU 0-100, ECE as a fraction (3 decimals)."""
    if value is None:
        return "—"
    if key.endswith("/ece"):
        return f"{value:.3f}"
    return f"{to_points(key, value):.1f}"


def main_columns(tasks: Sequence[TaskSpec], batches: Sequence[int]) -> list[tuple[str, str]]:
    """(column title, JSON path) of the main table; paths are read by `cell`."""
    cols = [("Artifact", "name"), ("Format", "format"), ("Precision", "precision"), ("Status", "status"),
            ("Size (MB)", "size_mb")]
    cols += [(title, f"metrics.{key}") for key, title in summary_columns(list(tasks))]
    first = next((t.name for t in tasks if t.kind == "classification"), None)
    if first:
        cols.append((f"{first} ECE", f"metrics.{first}/ece"))
    for b in batches:
        cols += [(f"ms/im (b{b})", f"latency.{b}.per_image_ms"), (f"img/s (b{b})", f"latency.{b}.images_per_s")]
    return cols


def detail_columns(tasks: Sequence[TaskSpec]) -> list[tuple[str, str]]:
    first = next((t.name for t in tasks if t.kind == "classification"), None)
    cols = [("Artifact", "name"), ("Params (M)", "params"), ("GMACs", "macs"), ("p50 b1 (ms)", "latency.1.p50_ms"),
            ("p90 b1 (ms)", "latency.1.p90_ms"), ("p99 b1 (ms)", "latency.1.p99_ms"),
            ("pre (ms)", "stages_ms.preprocess"), ("infer (ms)", "stages_ms.inference"),
            ("post (ms)", "stages_ms.postprocess"), ("encoder b1 (ms)", "encoder_decoder_ms.encoder_ms"),
            ("decoder b1 (ms)", "encoder_decoder_ms.decoder_ms"), ("model mem (MB)", "memory.model_mb")]
    for t in tasks:
        key = "sequence_agreement" if t.kind == "text" else "top1_agreement"
        cols.append((f"{t.name} agree", f"agreement.{t.name}/{key}"))
    if first:
        cols += [(f"{first} KL", f"agreement.{first}/mean_kl"), (f"{first} retention", f"retention.{first}/accuracy")]
    return cols


def _get(record: dict, path: str):
    """record["a"]["b"]... for path "a.b..." (metric keys contain "/", never "."); None when absent."""
    node = record
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def cell(record: dict, path: str) -> str:
    """The table text of one JSON value (the same formatting for every row and both tables)."""
    value = _get(record, path)
    if path.startswith("metrics."):
        return metric_cell(path[8:], value)
    if value is None:
        return "—"
    if path in ("params", "macs"):
        return f"{value / 1e6:.2f}" if path == "params" else f"{value / 1e9:.3f}"
    if path.endswith("images_per_s") or path.startswith("memory.") or path == "size_mb":
        return f"{value:.1f}"
    if path.startswith(("agreement.", "retention.")):
        return f"{value:.3f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(records: list[dict], columns: list[tuple[str, str]]) -> str:
    return "\n".join(table_lines([t for t, _ in columns], ([cell(r, p) for _, p in columns] for r in records)))


def interval_table(records: list[dict], tasks: Sequence[TaskSpec]) -> list[str]:
    """Markdown lines: each measured artifact's accuracy columns with their 95 % patient-bootstrap
    interval (report units), e.g. `91.6 (87.4–95.3)`."""
    ran = [r for r in records if r["status"] in RAN and r.get("ci95")]
    if not ran:
        return []
    cols = summary_columns(list(tasks))
    lines = ["Accuracy with its 95 % interval (patient bootstrap over the test images: patients drawn with "
             "replacement, all their images with them; %, BLEU 0-100):", "",
             *table_head(["Artifact", *(t for _, t in cols)])]
    for r in ran:
        cells = []
        for key, _ in cols:
            ci, value = r["ci95"].get(key), r["metrics"].get(key)
            cells.append(metric_cell(key, value) + (f" ({ci[0]:.1f}–{ci[1]:.1f})" if ci else ""))
        lines.append(table_row([r["name"], *cells]))
    return [*lines, ""]


def _spread(h: dict, key: str, spec: str = ".2f") -> str:
    """"3.10x (min 2.95x, max 3.21x over 5 rounds)" for a headline latency ratio."""
    value = h["latency_spread"].get(key)
    if not value:
        return "—"
    if value["rounds"] < 2:
        return f"{value['median']:{spec}}x (1 round)"
    return f"{value['median']:{spec}}x (min {value['min']:{spec}}x, max {value['max']:{spec}}x over {value['rounds']} rounds)"


def headline_lines(report: dict) -> list[str]:
    """The headline ratios as Markdown bullets (report.md and the README's bench block)."""
    h = report["headline"]
    names = {k: v or "—" for k, v in h["compared"].items()}
    lines = [f"- ensemble / student latency (batch 1): {_spread(h, 'latency_ensemble_over_student', '.1f')} "
             f"({names['ensemble']} vs {names['student']}); ensemble.fp32 / student.int8-cpu: "
             f"{_spread(h, 'latency_ensemble_over_student_int8', '.1f')}",
             f"- student.fp32 / student.int8-cpu latency (batch 1): {_spread(h, 'latency_fp32_over_int8_student')}; "
             f"batch {h['largest_batch']}: {_spread(h, 'latency_fp32_over_int8_student_largest_batch')}",
             f"- student.int8-cpu / its encoder-only sub-model (batch 1): "
             f"{_spread(h, 'latency_int8_student_over_its_encoder')}"]
    accs = ", ".join(f"{k} {_num(v, '.3f')}" for k, v in h["accuracy_student_over_ensemble"].items())
    lines.append(f"- student / ensemble accuracy ({names['student']} vs {names['ensemble']}): {accs}")
    return lines


def render_markdown(report: dict) -> str:
    """The whole report.md from the report dict."""
    tasks = [TaskSpec.from_dict(t) for t in report["tasks"]]
    m, s = report["machine"], report["settings"]
    records = report["artifacts"]
    out = [f"# Benchmark: {report['experiment']} ({report['written']})", "",
           f"Machine: {m.get('cpu')} ({m.get('usable_cores')} usable cores), GPU: {m.get('gpu') or 'none'}, "
           f"onnxruntime {m.get('onnxruntime')}, torch {m.get('torch')}, TensorRT {m.get('tensorrt') or 'none'}; "
           f"threads {s['threads']}, providers {s.get('providers') or 'default'}.",
           f"Test split: {_images_line(s)}; latency: {s['warmup']} warm-up runs, then the artifacts timed in "
           f"turn over {s.get('rounds', 1)} interleaved rounds (>= {s['duration_s']} s each at batch 1 and "
           f">= {s['batch_duration_s']} s at larger batches, all rounds together; every ONNX Runtime session "
           f"opened afresh and warmed up again at each round after the first, so the rounds also sample "
           f"sessions), threads pinned to cores {s.get('pinned_cores')}; ms/im = p50 batch time / batch; each ratio is the median of its per-round "
           f"ratios, with their min and max. Absolute times hold for this machine only; the ratios below "
           f"compare artifacts on it. Encoder / decoder ms: the ONNX artifact's encoder-only sub-model "
           f"(image -> classification outputs and pooled features), timed in the same rounds; decoder = "
           f"whole - encoder-only.", "",
           "## Headline (one run, one machine, same runtime, threads and images)", "", *headline_lines(report),
           "", "## Targets", ""]
    for t in report["targets"]:
        margin = "" if t["margin"] is None else f", margin {t['margin']:+.2f} {t['unit']}"
        value = "" if t["value"] is None else f": {t['value']:.2f} {t['unit']} (goal {t['goal']:g})"
        out.append(f"- **{t['status']}** {t['target']}{value}{margin}. {t['detail']}")
    out += ["", "## Artifacts", "", "Accuracies in %, BLEU 0-100, ECE 0-1.", "",
            markdown_table(records, main_columns(tasks, s["batch_sizes"])), "",
            f"Agreement and retention against `{report['reference']}` (KL(reference || artifact)); "
            "model mem = peak RSS of a fresh process per artifact while loading it and running the largest "
            "batch, minus the RSS of the imported runtime.", "", markdown_table(records, detail_columns(tasks)), "",
            *interval_table(records, tasks)]
    notes = [f"- `{r['name']}`: {r['reason']}" for r in records if r.get("reason")]
    notes += [f"- floor `{f}` matched no measured artifact" for f in report.get("unmatched_floors", [])]
    if notes:
        out += ["## Notes", "", *notes, ""]
    if report.get("plots"):
        out += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in report["plots"]], ""]
    return "\n".join(out)


# --- plots ----------------------------------------------------------------------------------------
def covers(record: dict, task_names: Sequence[str]) -> bool:
    """Whether an artifact answers every task (a teacher of a task subset does not, so it cannot stand in
    for the student on the device)."""
    return all(any(k.startswith(f"{t}/") for k in record.get("metrics", {})) for t in task_names)


def plot_accuracy_latency(records: list[dict], key: str, path: Path, task_names: Sequence[str] = ()) -> Path | None:
    """`key` (e.g. coarse/accuracy) against batch-1 ms/image (log) for every artifact. Artifacts that do
    all tasks are filled, the others (teachers of a task subset) hollow and grey; the Pareto front is
    drawn over the all-task artifacts, the ones that can be deployed."""
    pts = [(r["latency"]["1"]["per_image_ms"], to_points(key, r["metrics"][key]), r["name"], covers(r, task_names))
           for r in records if r["status"] in RAN and "1" in r.get("latency", {}) and key in r.get("metrics", {})]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    full = [i for i, p in enumerate(pts) if p[3]]
    front = [full[j] for j in pareto_front([(pts[i][0], pts[i][1]) for i in full])]
    for i, (x, y, name, complete) in enumerate(pts):
        colour = "tab:red" if i in front else "tab:blue" if complete else "grey"
        ax.scatter(x, y, s=40, zorder=3, edgecolors=colour, facecolors=colour if complete else "none")
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points",
                    color="black" if complete else "grey")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red",
            label="Pareto front (all-task artifacts)")
    ax.scatter([], [], s=40, color="tab:blue", label="does all tasks")
    if len(full) < len(pts):
        ax.scatter([], [], s=40, edgecolors="grey", facecolors="none", label="subset of the tasks (a teacher)")
    ax.set(xscale="log", xlabel="ms per image, batch 1 (log)", ylabel=points_label(key),
           title="accuracy vs latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_confusion(record: dict, path: Path) -> Path | None:
    conf = record.get("confusion")
    if not conf:
        return None
    return plot_confusion_matrix(conf["matrix"], conf["classes"], f"{record['name']}: {conf['task']}", path)


def write_plots(report: dict, out_dir: Path, fractions_png: Path | None) -> list[str]:
    """PNG files next to report.md; returns their names (relative links for the Markdown)."""
    tasks = [TaskSpec.from_dict(t) for t in report["tasks"]]
    made = []
    key = next(iter(primary_metrics(tasks)), None)
    if key and plot_accuracy_latency(report["artifacts"], key, out_dir / "accuracy_vs_latency.png",
                                     [t.name for t in tasks]):
        made.append("accuracy_vs_latency.png")
    for name in (report["reference"], "student.int8-cpu"):
        record = _ran(report["artifacts"], name or "")
        if record and plot_confusion(record, out_dir / f"confusion_{name}.png"):
            made.append(f"confusion_{name}.png")
    if fractions_png and fractions_png.is_file():
        atomic_write(out_dir / "fractions.png", lambda p: shutil.copyfile(fractions_png, p))
        made.append("fractions.png")
    return made


def build_report(experiment: str, records: list[dict], tasks: Sequence[TaskSpec], machine: dict, settings: dict,
                 reference: str | None, unmatched: Sequence[str] = ()) -> dict:
    return {"experiment": experiment, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine,
            "settings": settings, "tasks": [t.to_dict() for t in tasks], "reference": reference,
            "headline": headline(records, tasks), "targets": targets(records, tasks),
            "unmatched_floors": list(unmatched), "artifacts": records, "plots": []}


def write_report(report: dict, out_dir: Path, fractions_png: Path | None = None) -> str:
    """Plots, report.json and report.md (each written atomically); returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, out_dir, fractions_png)
    atomic_write_text(out_dir / f"{BENCH_REPORT}.json", json.dumps(report, indent=1, default=str))
    md = render_markdown(report)
    atomic_write_text(out_dir / f"{BENCH_REPORT}.md", md)
    return md

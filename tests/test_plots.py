"""Plots worth looking at: curves.png has one panel per task plus the loss, no duplicate or constant
series, integer epoch ticks; the label-fraction curve keeps one colour per model; the accuracy/latency plot
tells all-task artifacts from task-subset teachers."""

from __future__ import annotations

import math

import pytest

from benchmarks import report
from train import plots
from train.plots import curve_panels, plot_curves


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """{"fig": the last figure train.plots saved}; the PNG is still written."""
    kept: dict = {}

    def keep(fig, path):
        kept["fig"] = fig
        return plots.atomic_write(path, lambda p: fig.savefig(p, format="png"))

    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def _history(epochs: int = 4, seq_kd: bool = True) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        total = 3.0 / e
        rows.append({"epoch": e, "train/loss": total + (0.2 if seq_kd else 0.0), "train/total": total,
                     "train/coarse": 1.0 / e, "train/coarse/ce": 0.5 / e, "train/fine": 2.0 / e,
                     "val/coarse/accuracy": 0.5 + e / 20, "val/coarse/top1": 0.5 + e / 20,
                     "val/coarse/balanced_accuracy": 0.4 + e / 20, "val/fine/accuracy": 0.3 + e / 30,
                     "val/fine/top1": 0.3 + e / 30, "val/fine/top5": 1.0, "val/diagnosis/bleu": 30.0 + e,
                     "val/score": 0.5 + e / 50, "lr": 1e-3, "seconds": 2.0})
    return rows


def test_one_panel_per_task_after_the_loss():
    panels = curve_panels(_history())
    assert [p.title for p in panels] == ["training loss (epoch mean)", "coarse (validation)", "fine (validation)",
                                         "diagnosis (validation)"]


def test_no_duplicate_or_constant_series_and_units_are_percent():
    panels = {p.title.split()[0]: p for p in curve_panels(_history())}
    for panel in panels.values():
        values = list(panel.series.values())
        assert all(a != b for i, a in enumerate(values) for b in values[i + 1:]), panel.title
        assert all(len({v for v in s if not math.isnan(v)}) > 1 for s in values), panel.title
    assert list(panels["coarse"].series) == ["balanced_accuracy", "accuracy"]  # top1 == accuracy: left out
    assert "top1 = accuracy" in panels["coarse"].notes
    assert list(panels["fine"].series) == ["accuracy"] and "top5 constant 100.0" in panels["fine"].notes
    assert panels["coarse"].series["accuracy"][0] == pytest.approx(55.0)  # percent, like every report
    assert panels["diagnosis"].series["bleu"][0] == pytest.approx(31.0)  # BLEU stays 0-100


def test_total_is_drawn_and_explained_only_when_it_differs_from_the_loss():
    with_kd = curve_panels(_history(seq_kd=True))[0]
    assert "total of task losses" in with_kd.series and "sequence KD" in " ".join(with_kd.notes)
    plain = curve_panels(_history(seq_kd=False))[0]
    assert "total of task losses" not in plain.series and not plain.notes
    assert {"coarse loss", "fine loss"} <= set(plain.series)


def test_the_png_has_those_panels_with_integer_epoch_ticks_and_distinct_colours(tmp_path, drawn):
    out = plot_curves(_history(epochs=3), tmp_path / "curves.png", title="t")
    assert out.stat().st_size > 1000
    axes = drawn["fig"].axes
    assert len(axes) == 4
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        colours = [line.get_color() for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert len(colours) == len(set(colours)), colours
        legend = ax.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().y0 < ax.get_window_extent().y0  # below the axes


def test_each_model_keeps_its_colour_in_every_fraction_panel(tmp_path, drawn):
    bleu_of = {"baseline": 50.0, "ensemble": 60.0, "student": 55.0}  # the probe has no BLEU
    rows = [{"fraction": f, "model": m, "coarse/accuracy": 0.8,
             **({"diagnosis/bleu": bleu_of[m]} if m in bleu_of else {})}
            for f in (0.15, 1.0) for m in ("baseline", "ensemble", "linear probe", "student")]
    plots.plot_fractions(rows, [("coarse/accuracy", "coarse acc"), ("diagnosis/bleu", "BLEU")], tmp_path / "f.png")
    coarse, bleu = ({line.get_label(): line.get_color() for line in ax.get_lines()} for ax in drawn["fig"].axes)
    assert "linear probe" not in bleu and len(set(coarse.values())) == 4
    assert all(bleu[model] == coarse[model] for model in bleu)  # the probe's gap shifts no colour


def test_the_pareto_plot_marks_artifacts_that_cannot_do_every_task(tmp_path, monkeypatch):
    drawn = {}

    def keep(fig, path):
        drawn["fig"] = fig
        return path

    monkeypatch.setattr(report, "save_figure", keep)
    full = {"coarse/accuracy": 0.9, "fine/top5": 0.9, "diagnosis/bleu": 40.0}
    records = [{"name": "student.fp32", "status": "passed", "latency": {"1": {"per_image_ms": 5.0}}, "metrics": full},
               {"name": "ensemble.fp32", "status": "passed", "latency": {"1": {"per_image_ms": 50.0}},
                "metrics": {**full, "coarse/accuracy": 0.95}},
               {"name": "teacher_coarse.fp32", "status": "passed", "latency": {"1": {"per_image_ms": 2.0}},
                "metrics": {"coarse/accuracy": 0.97}}]
    report.plot_accuracy_latency(records, "coarse/accuracy", tmp_path / "p.png", ["coarse", "fine", "diagnosis"])
    ax = drawn["fig"].axes[0]
    hollow = [c for c in ax.collections if len(c.get_offsets()) and c.get_facecolors().size == 0]
    assert [tuple(c.get_offsets()[0]) for c in hollow] == [(2.0, 97.0)]  # the coarse-only teacher
    front = next(line for line in ax.get_lines() if "Pareto" in line.get_label())
    # The faster, more accurate subset teacher does not push the deployable artifacts off the front.
    assert list(front.get_xdata()) == [5.0, 50.0]
    assert "subset of the tasks (a teacher)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert report.covers(records[0], ["coarse", "fine"]) and not report.covers(records[2], ["coarse", "fine"])

"""The report's plots (issue 29, item 3): every method its own colour and marker by family, plain-number log
ticks, and a single-method run labelled by what was run."""

import json
from pathlib import Path

import pytest

from mop import report

STUDY = Path(__file__).resolve().parents[1] / "docs" / "study" / "smollm2"


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions close, kept open for inspection."""
    kept, close = [], report.plt.close
    monkeypatch.setattr(report.plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


def test_every_method_has_its_own_colour_and_marker_and_its_family_style():
    """The study's twelve methods: no colour or marker repeats; MoP variants solid, the extremes dashed (depth in
    greens, width in oranges), the peers dotted."""
    methods = report.collect_comparison(STUDY)["methods"]
    styles = report.method_styles(methods)
    assert len(styles) == len(methods) == 12
    assert len({s["color"] for s in styles.values()}) == len({s["marker"] for s in styles.values()}) == 12
    families = {label: (s["family"], s["linestyle"]) for label, s in styles.items()}
    assert families["mop"] == families["mop-kl"] == families["mop-bi-kd"] == ("MoP", "-")
    assert families["depth"] == ("depth-only", "--") and families["width-kd"] == ("width-only", "--")
    assert families["shortgpt"] == families["llm-pruner"] == ("peers", ":")
    assert styles["width"]["color"] in report.FAMILIES["width-only"][1]


def test_perplexity_ticks_are_plain_numbers_and_the_legend_is_beside_the_axes(figures, tmp_path):
    results = report.collect_comparison(STUDY)
    report.plot_comparison(results, "perplexity", "compression", "compression", 100, tmp_path / "ppl.png")
    figure, = figures
    axes = figure.axes[0]
    figure.canvas.draw()
    low, high = axes.get_ylim()
    ticks = [t.get_text() for t in axes.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert {"20", "50", "100", "1,000", "100,000"} <= set(ticks) and not any("10^" in t or "times" in t for t in ticks)
    legend = axes.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:3] == ["dense", "MoP variants", "mop"] and "peer methods" in labels
    assert legend.get_texts()[1].get_fontweight() == "bold" and legend.get_texts()[0].get_fontsize() >= 10
    inside = axes.get_window_extent()
    assert legend.get_window_extent().x0 > inside.x1  # beside the axes, over no line


def test_a_single_method_run_is_labelled_by_what_was_run(figures, tmp_path):
    """The README job's width-only run: "width-only seed 0", not "MoP seed 0"."""
    assert report.method_name({"method": "mop", "mode": "width"}) == "width-only"
    assert report.method_name({"method": "mop", "mode": "mop"}) == "MoP"
    assert report.method_name({"method": "llm-pruner", "mode": "mop"}) == "llm-pruner"
    results = json.loads((STUDY.parents[1] / "example-smollm2" / "results.json").read_text())
    report.write_plots(results, tmp_path, "width-only")
    legends = [figure.axes[0].get_legend() for figure in figures[:2]]
    assert [t.get_text() for t in legends[0].get_texts()] == ["dense", "width-only seed 0"]

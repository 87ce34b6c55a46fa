"""flatlab.report: figures, report.html / report.md, compare, and a real headless browser."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from flatlab.report import compare_runs, figure_caption, format_table, plots, render, write_report
from flatlab.train import ConfigError, Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(scale: float = 1.0) -> list[dict]:
    recs = []
    for step in range(0, 21, 2):
        rec = {"tag": "sgd", "step": step, "loss": scale / (1 + step), "val_acc": step / 40}
        if step % 10 == 0:
            rec.update(lambda_max=1.0 + step / 5, edge_gd=4.0, edge_sam=3.0)
        recs.append(rec)
    return recs


def _run(tmp_path: Path, name: str = "demo", scale: float = 1.0) -> Run:
    run = Run.create(tmp_path, name, {"lr": 0.5, "model": {"width": 8}, "note": "<b>x</b>"})
    for rec in _records(scale):
        run.log(rec)
    for rec in _records(2 * scale):
        run.log({**rec, "tag": "sam"})
    by_tag = {"sgd": run.metrics("sgd"), "sam": run.metrics("sam")}
    run.add_section("Eigenvalues", "λ_max against 2/lr.\n\nSecond <script>alert(1)</script>",
                    figures=[run.savefig(plots.eigenvalue_plot(by_tag), "eig")])
    run.add_section("Per optimizer", table=[{"optimizer": "sgd", "acc": 0.5},
                                            {"optimizer": "sam", "acc": 0.625}])
    run.add_section("Domains", figures=[run.savefig(plots.domain_bars(
        {"sgd": {"0": 0.9, "15": 0.8}, "sam": {"0": 0.95, "15": 0.85}}), "domains")])
    run.add_section("Sharpness", figures=[run.savefig(
        plots.bars({"sgd": 3.0, "sam": 1.5}, ylabel="λ_max"), "sharp")])
    run.mark_done({"sgd.acc": 0.5, "sam.acc": 0.625})
    return run


def _curves_of(ax) -> list:
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def test_curves_draw_one_line_per_label_and_skip_missing_values() -> None:
    recs = _records() + [{"tag": "sgd", "step": 30, "loss": "nan"}]
    fig = plots.curves({"a": recs, "b": _records(2.0)}, ["loss", "val_acc"])
    loss_ax, acc_ax = fig.axes[:2]
    assert [line.get_label() for line in _curves_of(loss_ax)] == ["a", "b"]
    assert len(loss_ax.lines[0].get_xdata()) == 11  # the string "nan" is not a point
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    assert plots.series(recs, "lambda_max") == ([0.0, 10.0, 20.0], [1.0, 3.0, 5.0])
    # the curve that stopped at "nan" is marked (✕ at its last finite point) and named
    (mark,) = [ln for ln in loss_ax.lines if ln.get_marker() == "X"]
    assert list(mark.get_xdata()) == [20.0]
    (cut,) = plots.clipped(fig)
    assert (cut.name, cut.key, cut.nonfinite_at) == ("a", "loss", 30.0)
    assert "a (loss non-finite from step 30)" in plots.caption(fig)


def test_eigenvalue_plot_draws_edges_in_the_curve_colour() -> None:
    fig = plots.eigenvalue_plot({"sgd": _records()})
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["sgd: λ_max", "sgd: 2/lr", "sgd: SAM edge"]
    colors = {line.get_color() for line in fig.axes[0].lines}
    assert len(colors) == 1


def _legends_outside_axes(fig) -> None:
    """Every legend's box lies outside every axes' box (drawn, in display pixels)."""
    fig.canvas.draw()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), (box, ax.get_window_extent())


def _diverged_records() -> dict[str, list[dict]]:
    """GD and SAM near the edge 2/lr = 2; USAM blows up to 4.8e13 at step 30 (as in eos)."""
    gd = [{"step": s, "lambda_max": 1.0 + s / 40, "edge_gd": 2.0} for s in range(0, 101, 10)]
    sam = [{"step": s, "lambda_max": 0.9 + s / 50, "edge_gd": 2.0, "edge_sam": 1.5}
           for s in range(0, 101, 10)]
    usam = [{"step": 0, "lambda_max": 0.55, "edge_gd": 2.0, "edge_usam": 1.0},
            {"step": 10, "lambda_max": 0.94, "edge_gd": 2.0, "edge_usam": 1.0},
            {"step": 20, "lambda_max": 1.44, "edge_gd": 2.0, "edge_usam": 1.0},
            {"step": 30, "lambda_max": 4.8e13, "edge_gd": 2.0, "edge_usam": 1.0}]
    return {"GD": gd, "SAM": sam, "USAM ρ=1": usam}


def test_a_diverged_curve_is_clipped_marked_and_named() -> None:
    fig = plots.eigenvalue_plot(_diverged_records())
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high < 5  # the others are not flattened: the axis ends near the curves on scale
    usam = next(ln for ln in ax.lines if ln.get_label() == "USAM ρ=1: λ_max")
    assert max(usam.get_ydata()) <= high  # clipped, not drawn at 4.8e13
    (marker,) = [ln for ln in ax.lines if ln.get_marker() == "^"]
    assert list(marker.get_xdata()) == [30.0]
    (cut,) = plots.clipped(fig)
    assert (cut.name, cut.peak, cut.peak_at) == ("USAM ρ=1", 4.8e13, 30.0)
    text = plots.caption(fig)
    assert text.startswith("Diverged: USAM ρ=1 (lambda_max reached 4.8e+13 at step 30)")
    assert "GD" not in text.split(".")[0] and "SAM (" not in text
    # the shared 2/lr = 2 is one grey line, not three on top of each other
    twos = [ln for ln in ax.lines if list(ln.get_ydata()) and set(ln.get_ydata()) == {2.0}]
    assert len(twos) == 1 and twos[0].get_color() == "#555555"
    assert list(twos[0].get_xdata()) == [0.0, 100.0]
    _legends_outside_axes(fig)


def test_curves_clip_a_diverged_loss_and_keep_the_others_readable() -> None:
    ok = [{"step": s, "loss": 2.3 / (1 + s)} for s in range(20)]
    bad = [{"step": s, "loss": 2.3 * 10 ** s} for s in range(12)] + [{"step": 12, "loss": "inf"}]
    fig = plots.curves({"sgd": ok, "sam": ok, "usam": bad}, "loss")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] < 10
    cut = plots.clipped(fig)
    assert [(c.name, c.nonfinite_at) for c in cut] == [("usam", 12.0)]
    assert "usam (loss reached 2.3e+11 at step 11; loss non-finite from step 12)" in \
        plots.caption(fig)
    assert plots.caption(plots.curves({"sgd": ok, "sam": ok}, "loss")) == ""


def test_three_panels_wrap_two_a_row() -> None:
    recs = [{"step": s, "loss": 1 / (1 + s), "a_acc": s / 10, "b_acc": s / 20} for s in range(9)]
    fig = plots.curves({"x": recs}, ["loss", "a_acc", "b_acc"])
    fig.canvas.draw()
    boxes = [ax.get_window_extent() for ax in fig.axes]
    assert len(boxes) == 3 and boxes[0].y0 == pytest.approx(boxes[1].y0)
    assert boxes[2].y1 < boxes[0].y0  # the third panel sits below the first row


def test_loss_on_less_than_a_decade_keeps_a_linear_axis() -> None:
    recs = [{"step": s, "loss": 0.3 - 0.01 * s} for s in range(10)]
    assert plots.curves({"a": recs}, "loss").axes[0].get_yscale() == "linear"


def test_legends_of_many_runs_sit_below_the_axes_grouped() -> None:
    """6 phases x 3 runs as (phase, run) pairs: 6 colours + 3 line styles = 9 entries."""
    hist = {(f"phase{p}", f"run{r}"): [{"step": s, "loss": (p + 1) / (1 + s) + r,
                                        "val_acc": s / 20} for s in range(20)]
            for p in range(6) for r in range(3)}
    fig = plots.curves(hist, ["loss", "val_acc"])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        *(f"phase{p}" for p in range(6)), "run0", "run1", "run2"]
    loss_lines = _curves_of(fig.axes[0])
    assert len(loss_lines) == 18
    assert len({ln.get_color() for ln in loss_lines}) == 6
    assert len({ln.get_linestyle() for ln in loss_lines}) == 3
    _legends_outside_axes(fig)
    eig = {k: [{"step": s, "lambda_max": 1 + s, "edge_gd": 2.0 + len(k[0])} for s in range(5)]
           for k in hist}
    _legends_outside_axes(plots.eigenvalue_plot(eig))
    _legends_outside_axes(plots.domain_bars({"sgd": {"0": 0.9, "15": 0.8},
                                             "sam": {"0": 0.95, "15": 0.85}}))


def test_bars_clip_a_diverged_bar_and_tilt_long_labels() -> None:
    fig = plots.bars({"relu": -0.004, "jsrelu+zb-input": -0.005, "jsrelu+zb-output": -0.0053,
                      "usam": 7e9}, ylabel="sharpness")
    ax = fig.axes[0]
    assert max(p.get_height() for p in ax.patches) == pytest.approx(0.0053)
    assert [c.name for c in plots.clipped(fig)] == ["usam"]
    assert "usam (sharpness reached 7e+09)" in plots.caption(fig)
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {30.0}
    notes = [t.get_text() for t in ax.texts]
    assert notes[-1] == "7e+09 ▲" and notes[0] == "-0.004"


def test_bars_and_domain_bars_heights() -> None:
    fig = plots.bars({"sgd": 3.0, "sam": 1.5}, ylabel="sharpness")
    assert [p.get_height() for p in fig.axes[0].patches] == [3.0, 1.5]
    fig = plots.domain_bars({"sgd": {"a": 0.1, "b": 0.2}, "sam": {"a": 0.3, "b": 0.4}})
    assert sorted(p.get_height() for p in fig.axes[0].patches) == [0.1, 0.2, 0.3, 0.4]


def test_report_html_inlines_figures_and_escapes_text(tmp_path) -> None:
    run = _run(tmp_path)
    html_path, md_path = write_report(run.path)
    html = html_path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3  # eig, domains, sharp (no automatic curves: figures were drawn)
    assert all(base64.b64decode(img)[:8] == PNG_MAGIC for img in images)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html  # config values are escaped too
    for text in ("Results", "Eigenvalues", "Per optimizer", "Settings", "model.width",
                 "<td>sam</td>", "finished", "training phases: sam, sgd"):
        assert text in html
    md = md_path.read_text()
    assert "| optimizer | acc |" in md and "| sam | 0.625 |" in md
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (run.path / fig).is_file()


def test_automatic_curves_when_the_experiment_drew_no_figures(tmp_path) -> None:
    run = Run.create(tmp_path, "x", {})
    for rec in _records():
        run.log(rec)
    html_path, md_path = write_report(run.path)
    html = html_path.read_text()
    assert "Training curves" in html and html.count("data:image/png;base64,") == 2
    assert "incomplete" in html  # no done marker
    assert "plots/auto_curves.png" in md_path.read_text()


def test_non_run_folder_is_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a run folder"):
        write_report(tmp_path / "nothing")


def test_compare_overlays_runs_and_tabulates_final_metrics(tmp_path) -> None:
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", scale=3.0)
    result = compare_runs([a.path, b.path], tmp_path / "cmp")
    rows, out = result.rows, result.out_dir
    labels = [r["run"] for r in rows]
    assert labels == [f"{a.path.name}/sgd", f"{a.path.name}/sam", f"{b.path.name}/sgd",
                      f"{b.path.name}/sam"]
    assert rows[2]["loss"] == pytest.approx(3.0 / 21)
    assert rows[0]["lambda_max"] == 5.0
    assert (out / "compare.html").read_text().count("data:image/png;base64,") == 2
    assert format_table(rows).splitlines()[0].split()[:3] == ["run", "steps", "loss"]
    with pytest.raises(ConfigError, match="at least one run"):
        compare_runs([])


def _configured_run(tmp_path: Path, name: str, config: dict, tags=("sgd", "sam")) -> Run:
    run = Run.create(tmp_path, name, config)
    for tag in tags:
        for rec in _records():
            run.log({**rec, "tag": tag})
    run.mark_done({})
    return run


def test_compare_tabulates_the_settings_that_differ(tmp_path) -> None:
    a = _configured_run(tmp_path, "demo", {"lr": 0.5, "model": {"width": 8}, "seed": 0})
    b = _configured_run(tmp_path, "demo", {"lr": 0.1, "model": {"width": 8}, "seed": 0,
                                           "rho": 0.05})
    result = compare_runs([a.path, b.path], tmp_path / "cmp")
    assert result.settings == [
        {"setting": "lr", a.path.name: "0.5", b.path.name: "0.1"},
        {"setting": "rho", a.path.name: "-", b.path.name: "0.05"}]
    html = (result.out_dir / "compare.html").read_text()
    assert "Settings that differ" in html and "<td>rho</td>" in html
    assert "| lr | 0.5 | 0.1 |" in (result.out_dir / "compare.md").read_text()
    same = compare_runs([a.path, a.path], tmp_path / "same")
    assert same.settings == [] and "same settings" in (same.out_dir / "compare.md").read_text()


def test_compare_groups_the_legend_outside_and_warns_nothing(tmp_path) -> None:
    """3 runs x 2 phases: the legend names each phase and each run once, below the axes."""
    runs = [_configured_run(tmp_path, "demo", {"lr": lr}) for lr in (0.5, 0.2, 0.1)]
    figures = {}
    real_save = render.save_png

    def keep(fig, path):
        figures[path.stem] = fig
        fig.canvas.draw()
        real_save(fig, path)

    with warnings.catch_warnings(record=True) as caught, \
            pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("always")
        mp.setattr(render, "save_png", keep)
        result = compare_runs([r.path for r in runs], tmp_path / "cmp")
    assert [str(w.message) for w in caught] == []
    assert sorted(figures) == ["compare_curves", "compare_eigenvalues"]
    (legend,) = figures["compare_curves"].legends
    assert [t.get_text() for t in legend.get_texts()] == ["sgd", "sam",
                                                          *(r.path.name for r in runs)]
    for fig in figures.values():
        _legends_outside_axes(fig)
    assert len(result.rows) == 6


def test_quick_runs_open_with_a_preview_banner(tmp_path) -> None:
    quick = _configured_run(tmp_path, "eos", {"quick": True, "lr": 0.5})
    full = _configured_run(tmp_path, "eos", {"quick": False, "lr": 0.5})
    html_q, md_q = write_report(quick.path)
    body = html_q.read_text().split("<body>", 1)[1]
    assert body.startswith("\n<h1>flatlab run: eos</h1>\n<div class=\"banner\">")
    assert "previews, not results" in body.split("</div>", 1)[0]
    assert md_q.read_text().splitlines()[2].startswith("> **Quick preview (--quick)")
    html_f, md_f = write_report(full.path)
    assert "previews, not results" not in html_f.read_text() + md_f.read_text()
    result = compare_runs([quick.path, full.path], tmp_path / "cmp")
    assert result.quick == [quick.path.name]
    assert f"{quick.path.name}: Quick preview" in (result.out_dir / "compare.html").read_text()


def test_report_prints_the_caption_of_a_clipped_figure(tmp_path) -> None:
    run = Run.create(tmp_path, "eos", {})
    fig = plots.eigenvalue_plot(_diverged_records())
    path = run.savefig(fig, "qrm_lambda")
    assert figure_caption(path).startswith("Diverged: USAM ρ=1")
    run.add_section("T2", "λ_max per run.", figures=[path])
    run.add_section("Plain", figures=[run.savefig(plots.bars({"a": 1.0, "b": 2.0},
                                                             ylabel="x"), "plain")])
    html_path, md_path = write_report(run.path)
    html = html_path.read_text()
    assert html.count("<figcaption>") == 1
    assert "<figcaption>Diverged: USAM ρ=1 (lambda_max reached 4.8e+13 at step 30)" in html
    assert "*Diverged: USAM ρ=1" in md_path.read_text()
    # figures are shown at one scale: CSS_PX_PER_INCH per inch of a 150 dpi PNG
    widths = [int(w) for w in re.findall(r'<img alt="[^"]*" style="width:(\d+)px"', html)]
    assert len(widths) == 2 and all(300 < w < 1100 for w in widths)


def test_a_damaged_figure_file_does_not_stop_the_report(tmp_path) -> None:
    run = Run.create(tmp_path, "x", {})
    (run.plots_dir / "broken.png").write_bytes(PNG_MAGIC + b"truncated")
    run.add_section("Broken", figures=["plots/broken.png"])
    html = write_report(run.path)[0].read_text()
    assert '<figure><img alt="Broken" src="data:image/png;base64,' in html


def test_a_long_list_of_training_phases_folds_away(tmp_path) -> None:
    run = _configured_run(tmp_path, "eos", {}, tags=[f"phase{i}" for i in range(12)])
    html = write_report(run.path)[0].read_text()
    assert "· 12 training phases</p>" in html
    assert "<details class=\"meta\"><summary>the 12 training phases</summary>phase0" in html


CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).exists()),
                None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed (.ci/run installs "
                    "Debian's chromium with apt-get; install it to run this test)")
def test_report_opens_in_headless_chromium_without_console_errors(tmp_path) -> None:
    run = _run(tmp_path)
    html_path, _ = write_report(run.path)
    shot = run.path / "report_screenshot.png"
    common = [CHROMIUM, *FLAGS, "--enable-logging=stderr", "--v=0", "--window-size=1200,2400"]
    proc = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile1'}", f"--screenshot={shot}",
         html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    assert shot.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank page
    dom = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    assert [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln] == []
    assert dom.stdout.count("<img") == 3 and "flatlab run: demo" in dom.stdout

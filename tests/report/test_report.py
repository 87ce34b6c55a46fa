"""flatlab.report: figures, report.html / report.md, compare, and a real headless browser."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from flatlab.report import compare_runs, format_table, plots, write_report
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


def test_curves_draw_one_line_per_label_and_skip_missing_values() -> None:
    recs = _records() + [{"tag": "sgd", "step": 30, "loss": "nan"}]
    fig = plots.curves({"a": recs, "b": _records(2.0)}, ["loss", "val_acc"])
    loss_ax, acc_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.lines] == ["a", "b"]
    assert len(loss_ax.lines[0].get_xdata()) == 11  # the string "nan" is not a point
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    assert plots.series(recs, "lambda_max") == ([0.0, 10.0, 20.0], [1.0, 3.0, 5.0])


def test_eigenvalue_plot_draws_edges_in_the_curve_colour() -> None:
    fig = plots.eigenvalue_plot({"sgd": _records()})
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["sgd: λ_max", "sgd: 2/lr", "sgd: SAM edge"]
    colors = {line.get_color() for line in fig.axes[0].lines}
    assert len(colors) == 1


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
    rows, out = compare_runs([a.path, b.path], tmp_path / "cmp")
    labels = [r["run"] for r in rows]
    assert labels == [f"{a.path.name}/sgd", f"{a.path.name}/sam", f"{b.path.name}/sgd",
                      f"{b.path.name}/sam"]
    assert rows[2]["loss"] == pytest.approx(3.0 / 21)
    assert rows[0]["lambda_max"] == 5.0
    assert (out / "compare.html").read_text().count("data:image/png;base64,") == 2
    assert format_table(rows).splitlines()[0].split()[:3] == ["run", "steps", "loss"]
    with pytest.raises(ConfigError, match="at least one run"):
        compare_runs([])


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

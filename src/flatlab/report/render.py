"""``report.html`` and ``report.md`` of a run folder, and the comparison of several runs.

The HTML page is self-contained: figures are inlined as base64 PNG ``data:`` URIs, the style is
one ``<style>`` block, there is no script, so it opens anywhere (and in a headless browser
without console errors). The Markdown twin links the same PNGs by relative path. Page order:
what ran (experiment, folder, status), the headline results (the ``done`` marker), the
experiment's sections, training curves of every ``fit`` tag (when the experiment drew no
figures itself), then the full resolved config.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flatlab.report import plots
from flatlab.report.summary import MEASURE_PREFIX
from flatlab.train.rundir import ConfigError, Run, atomic_write_text, read_config_json

__all__ = ["compare_runs", "write_report"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.meta{color:#555;font-size:.9em} .ok{color:#17692b;font-weight:bold}
.bad{color:#a4141c;font-weight:bold}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def _html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _md_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _training_records(run: Run) -> list[dict[str, Any]]:
    """The run's records without per-model measurements (``measure/...`` tags), which are
    summarized by :func:`experiment_summaries` rather than drawn as training curves."""
    return [r for r in run.metrics() if not str(r.get("tag", "")).startswith(MEASURE_PREFIX)]


def _auto_figures(run: Run) -> list[Path]:
    """Loss / accuracy curves (and λ_max when logged) of every fit tag, saved under plots/."""
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for rec in _training_records(run):
        by_tag.setdefault(str(rec.get("tag", "train")), []).append(rec)
    if not by_tag:
        return []
    keys = ["loss"]
    seen = {k for recs in by_tag.values() for r in recs for k in r}
    keys += sorted(k for k in seen if k.endswith("_acc"))[:3]
    figs = [run.savefig(plots.curves(by_tag, keys), "auto_curves")]
    if "lambda_max" in seen:
        figs.append(run.savefig(plots.eigenvalue_plot(by_tag), "auto_eigenvalues"))
    return figs


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``run_dir``; return both paths.

    Raises:
        ConfigError: ``run_dir`` is not a run folder.
    """
    run = Run.open(run_dir)
    meta = read_config_json(run.path)
    name = meta.get("experiment", "?")
    status = "finished" if run.done else "incomplete (no done marker)"
    results = run.results()
    sections = run.sections()
    # automatic curves only when the experiment drew no figures itself (no duplicates)
    auto = [] if any(sec.get("figures") for sec in sections) else _auto_figures(run)
    tags = sorted({str(r.get("tag")) for r in _training_records(run) if "tag" in r})

    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
         f"<title>flatlab {html.escape(name)} report</title><style>{_CSS}</style></head><body>",
         f"<h1>flatlab run: {html.escape(name)}</h1>",
         f"<p class=\"meta\">folder <code>{html.escape(str(run.path))}</code> · created "
         f"{html.escape(str(meta.get('created', '')))} · flatlab "
         f"{html.escape(str(meta.get('flatlab_version', '')))} · status <span class=\""
         f"{'ok' if run.done else 'bad'}\">{html.escape(status)}</span>"
         + (f" · training phases: {html.escape(', '.join(tags))}" if tags else "") + "</p>"]
    m = [f"# flatlab run: {name}", "",
         f"folder `{run.path}` · created {meta.get('created', '')} · status {status}"
         + (f" · training phases: {', '.join(tags)}" if tags else ""), ""]
    if results:
        rows = [{"result": k, "value": v} for k, v in _flatten(results).items()]
        h += ["<h2>Results</h2>", _html_table(rows)]
        m += ["## Results", "", _md_table(rows), ""]
    for sec in sections:
        h += [f"<h2>{html.escape(sec['title'])}</h2>", _paragraphs(sec.get("text", "")),
              _html_table(sec.get("table") or [])]
        m += [f"## {sec['title']}", "", sec.get("text", ""), "", _md_table(sec.get("table") or []),
              ""]
        for fig in sec.get("figures", []):
            path = run.path / fig
            if path.is_file():
                h.append(_img(path, sec["title"]))
                m += [f"![{sec['title']}]({fig})", ""]
    if auto:
        h.append("<h2>Training curves</h2>")
        m += ["## Training curves", ""]
        for path in auto:
            h.append(_img(path, path.stem))
            m += [f"![{path.stem}]({path.relative_to(run.path)})", ""]
    rows = [{"key": k, "value": v} for k, v in _flatten(run.config).items()]
    h += ["<h2>Settings</h2>", _html_table(rows), "</body></html>"]
    m += ["## Settings", "", _md_table(rows), ""]
    html_path, md_path = run.path / "report.html", run.path / "report.md"
    atomic_write_text(html_path, "\n".join(x for x in h if x) + "\n")
    atomic_write_text(md_path, "\n".join(m).rstrip() + "\n")
    return html_path, md_path


def _final(records: Sequence[Mapping[str, Any]], key: str) -> Any:
    for rec in reversed(records):
        if key in rec:
            return rec[key]
    return None


def experiment_summaries(runs: Sequence[Run | str | Path]) -> list[dict[str, Any]]:
    """Rows of each run's own results table, for experiments that define one.

    An experiment module may define ``summary_rows(records) -> rows`` (e.g. the flatness
    study's mean ± s.e. over seeds); ``flatlab compare`` then rebuilds that table from the
    run folder's ``metrics.jsonl`` alone, each row labelled with its run folder.
    """
    import importlib

    out: list[dict[str, Any]] = []
    for run in runs:
        run = run if isinstance(run, Run) else Run.open(run)
        name = run.experiment
        try:
            module = importlib.import_module(f"flatlab.experiments.{name}") if name else None
        except ImportError:
            module = None
        summary = getattr(module, "summary_rows", None)
        if callable(summary):
            out += [{"run": run.path.name, **row} for row in summary(run.metrics())]
    return out


def compare_runs(
    run_dirs: Sequence[str | Path], out: str | Path | None = None
) -> tuple[list[dict[str, Any]], Path]:
    """Overlay the curves of several runs and tabulate their final metrics.

    Each run is labelled by its folder name; with several fit tags a line is ``folder/tag``.
    Writes ``compare.html``, ``compare.md`` and ``plots/compare_*.png`` into ``out``
    (default: ``./compare-<timestamp>``).

    Returns:
        ``(rows, out_dir)``: one row per (run, tag) with final loss and accuracies.

    Raises:
        ConfigError: fewer than one run, or a folder that is not a run folder.
    """
    if not run_dirs:
        raise ConfigError("compare needs at least one run folder")
    runs = [Run.open(d) for d in run_dirs]
    out_dir = Path(out) if out is not None else Path(f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    histories: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_tag: dict[str, list[dict[str, Any]]] = {}
        for rec in _training_records(run):
            by_tag.setdefault(str(rec.get("tag", "train")), []).append(rec)
        for tag, recs in by_tag.items():
            label = run.path.name if len(by_tag) == 1 else f"{run.path.name}/{tag}"
            histories[label] = recs
    keys = {k for recs in histories.values() for r in recs for k in r}
    acc_keys = sorted((k for k in keys if k.endswith("_acc")),
                      key=lambda k: (not k.startswith("val"), k))  # validation first
    metric_keys = ["loss", *acc_keys, *sorted(k for k in keys if k.endswith("_loss"))]
    rows = []
    for label, recs in histories.items():
        row: dict[str, Any] = {"run": label, "steps": _final(recs, "step")}
        for k in metric_keys + (["lambda_max"] if "lambda_max" in keys else []):
            row[k] = _final(recs, k)
        rows.append(row)
    summaries = experiment_summaries(runs)
    fig_paths = []
    fig = plots.curves(histories, ["loss", *acc_keys[:2]])
    fig_paths.append(out_dir / "plots" / "compare_curves.png")
    fig.savefig(fig_paths[-1], dpi=150, bbox_inches="tight")
    plots.plt.close(fig)
    if "lambda_max" in keys:
        fig = plots.eigenvalue_plot(histories)
        fig_paths.append(out_dir / "plots" / "compare_eigenvalues.png")
        fig.savefig(fig_paths[-1], dpi=150, bbox_inches="tight")
        plots.plt.close(fig)
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>flatlab "
         f"compare</title><style>{_CSS}</style></head><body><h1>flatlab compare</h1>",
         "<h2>Final metrics</h2>", _html_table(rows)]
    if summaries:
        h += ["<h2>Results tables of the experiments</h2>", _html_table(summaries)]
    h += ["<h2>Curves</h2>"]
    h += [_img(p, p.stem) for p in fig_paths] + ["</body></html>"]
    m = ["# flatlab compare", "", "## Final metrics", "", _md_table(rows), ""]
    if summaries:
        m += ["## Results tables of the experiments", "", _md_table(summaries), ""]
    m += ["## Curves", ""]
    m += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in fig_paths]
    atomic_write_text(out_dir / "compare.html", "\n".join(h) + "\n")
    atomic_write_text(out_dir / "compare.md", "\n".join(m) + "\n")
    return rows, out_dir


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table for the terminal (used by ``flatlab compare``)."""
    if not rows:
        return ""
    cols = _columns(rows)
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)

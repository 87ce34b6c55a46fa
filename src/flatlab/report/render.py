"""``report.html`` and ``report.md`` of a run folder, and the comparison of several runs.

The HTML page is self-contained: figures are inlined as base64 PNG ``data:`` URIs, the style is
one ``<style>`` block, there is no script, so it opens anywhere (and in a headless browser
without console errors). The Markdown twin links the same PNGs by relative path. Page order:
a banner when the run is a ``--quick`` preview, what ran (experiment, folder, status), the
headline results (the ``done`` marker), the experiment's sections, training curves of every
``fit`` tag (when the experiment drew no figures itself), then the full resolved config.
A figure's caption (stored in its PNG by ``Run.savefig``, e.g. the diverged runs it clipped) is
printed under it. Figures are shown at one scale (``CSS_PX_PER_INCH`` CSS pixels per inch of
figure), so their text has one size across figures, near the page's.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlab.report import plots
from flatlab.report.summary import MEASURE_PREFIX
from flatlab.rundir import ConfigError, Run, atomic_write_text, read_config_json, save_png

__all__ = ["QUICK_BANNER", "Comparison", "Section", "compare_runs", "differing_settings",
           "experiment_summaries", "figure_caption", "format_table", "joined_tables",
           "write_report"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.6em 0} img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;max-width:900px}
.meta{color:#555;font-size:.9em} .ok{color:#17692b;font-weight:bold}
.bad{color:#a4141c;font-weight:bold}
.banner{background:#fff4d6;border:1px solid #e0b84c;border-left:6px solid #e0a800;
padding:.6em 1em;margin:1em 0}
"""

CSS_PX_PER_INCH = 120  # matplotlib's 10 pt text shows at 17 px, a little above the page's
QUICK_BANNER = ("Quick preview (--quick): data, steps and seeds were shrunk so that the run "
                "finishes in about a minute. Its numbers are previews, not results: nan, NO and "
                "FAIL below say nothing about the methods. Run without --quick for the results.")


@dataclass(frozen=True)
class Section:
    """One report section as the experiment added it (``Run.add_section``)."""

    title: str
    text: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Section:
        return cls(str(raw.get("title", "")), str(raw.get("text") or ""),
                   list(raw.get("table") or []), [str(f) for f in raw.get("figures") or []])


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


def figure_caption(path: Path) -> str:
    """The caption stored in a PNG by ``Run.savefig`` ("" when it has none)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(getattr(im, "text", {}).get("Description", ""))
    except OSError:
        return ""


def _figure(path: Path, alt: str) -> tuple[str, str]:
    """``(html, caption)`` of a PNG: inlined, at its drawn size, with its caption under it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            dpi = float((im.info.get("dpi") or (150,))[0]) or 150.0
            size = f' style="width:{round(im.size[0] * CSS_PX_PER_INCH / dpi)}px"'
    except OSError:  # not an image PIL reads: inline it as it is, at the browser's size
        size = ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = figure_caption(path)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img alt="{html.escape(alt)}"{size} '
            f'src="data:image/png;base64,{data}">{cap}</figure>', caption)


def _md_figure(alt: str, rel: str, caption: str) -> list[str]:
    return [f"![{alt}]({rel})", *([f"*{caption}*"] if caption else []), ""]


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _training_records(run: Run) -> list[dict[str, Any]]:
    """The run's records without per-model measurements (``measure/...`` tags), which are
    summarized by :func:`experiment_summaries` rather than drawn as training curves."""
    return [r for r in run.metrics() if not str(r.get("tag", "")).startswith(MEASURE_PREFIX)]


def _by_tag(run: Run) -> dict[str, list[dict[str, Any]]]:
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for rec in _training_records(run):
        by_tag.setdefault(str(rec.get("tag", "train")), []).append(rec)
    return by_tag


def _auto_figures(run: Run) -> list[Path]:
    """Loss / accuracy curves (and λ_max when logged) of every fit tag, saved under plots/."""
    by_tag = _by_tag(run)
    if not by_tag:
        return []
    keys = ["loss"]
    seen = {k for recs in by_tag.values() for r in recs for k in r}
    keys += sorted(k for k in seen if k.endswith("_acc"))[:3]
    figs = [run.savefig(plots.curves(by_tag, keys), "auto_curves")]
    if "lambda_max" in seen:
        figs.append(run.savefig(plots.eigenvalue_plot(by_tag), "auto_eigenvalues"))
    return figs


def _phases(tags: Sequence[str]) -> tuple[str, str, str]:
    """The training phases: for the meta line (HTML), folded below it when long, Markdown."""
    if not tags:
        return "", "", ""
    listed = ", ".join(tags)
    if len(tags) <= 6:
        return f" · training phases: {html.escape(listed)}", "", f" · training phases: {listed}"
    return (f" · {len(tags)} training phases", f"<details class=\"meta\"><summary>the "
            f"{len(tags)} training phases</summary>{html.escape(listed)}</details>",
            f" · {len(tags)} training phases: {listed}")


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
    sections = [Section.parse(s) for s in run.sections()]
    # automatic curves only when the experiment drew no figures itself (no duplicates)
    auto = [] if any(sec.figures for sec in sections) else _auto_figures(run)
    phases_html, phases_folded, phases_md = _phases(sorted(_by_tag(run)))

    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
         f"<title>flatlab {html.escape(name)} report</title><style>{_CSS}</style></head><body>",
         f"<h1>flatlab run: {html.escape(name)}</h1>"]
    m = [f"# flatlab run: {name}", ""]
    if run.config.get("quick"):
        h.append(f"<div class=\"banner\"><strong>{html.escape(QUICK_BANNER)}</strong></div>")
        m += [f"> **{QUICK_BANNER}**", ""]
    h += [f"<p class=\"meta\">folder <code>{html.escape(str(run.path))}</code> · created "
          f"{html.escape(str(meta.get('created', '')))} · flatlab "
          f"{html.escape(str(meta.get('flatlab_version', '')))} · status <span class=\""
          f"{'ok' if run.done else 'bad'}\">{html.escape(status)}</span>{phases_html}</p>",
          phases_folded]
    m += [f"folder `{run.path}` · created {meta.get('created', '')} · status {status}"
          + phases_md, ""]
    if results:
        rows = [{"result": k, "value": v} for k, v in _flatten(results).items()]
        h += ["<h2>Results</h2>", _html_table(rows)]
        m += ["## Results", "", _md_table(rows), ""]
    for sec in sections:
        h += [f"<h2>{html.escape(sec.title)}</h2>", _paragraphs(sec.text), _html_table(sec.table)]
        m += [f"## {sec.title}", "", sec.text, "", _md_table(sec.table), ""]
        for fig in sec.figures:
            path = run.path / fig
            if path.is_file():
                tag, caption = _figure(path, sec.title)
                h.append(tag)
                m += _md_figure(sec.title, fig, caption)
    if auto:
        h.append("<h2>Training curves</h2>")
        m += ["## Training curves", ""]
        for path in auto:
            tag, caption = _figure(path, path.stem)
            h.append(tag)
            m += _md_figure(path.stem, str(path.relative_to(run.path)), caption)
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

    An experiment may register a ``summary_rows(records) -> rows`` hook (e.g. the flatness
    study's mean ± s.e. over seeds); ``flatlab compare`` then rebuilds that table from the
    run folder's ``metrics.jsonl`` alone, each row labelled with its run folder. The
    experiments are imported only here, and only for runs of a registered experiment.
    """
    out: list[dict[str, Any]] = []
    for run in runs:
        run = run if isinstance(run, Run) else Run.open(run)
        summary = _hook(run.experiment, "summary_rows")
        if summary is not None:
            out += [{"run": run.path.name, **row} for row in summary(run.metrics())]
    return out


def joined_tables(runs: Sequence[Run | str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each experiment's ``joined_rows`` table over the measurements of all its runs joined.

    A study split over several run folders (``flatlab run flatness --set tasks=[t]`` per task)
    gets one table, e.g. the flatness verdicts with their paired CIs, as if it had run at once.
    The table is not built for an experiment whose runs share a measurement tag (the same
    task, optimizer and seed measured twice: joining would mix two runs' seeds); a note
    naming the tag and the runs says so instead.

    Returns:
        ``(rows, notes)``: rows labelled with ``experiment`` and ``runs`` (how many joined).
    """
    by_exp: dict[str, list[Run]] = {}
    for run in runs:
        run = run if isinstance(run, Run) else Run.open(run)
        if run.experiment:
            by_exp.setdefault(run.experiment, []).append(run)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name, members in by_exp.items():
        hook = _hook(name, "joined_rows")
        if hook is None:
            continue
        owner: dict[str, str] = {}
        records, clash = [], None
        for run in members:
            for rec in run.metrics():
                tag = str(rec.get("tag", ""))
                if tag.startswith(MEASURE_PREFIX):
                    if owner.setdefault(tag, run.path.name) != run.path.name and clash is None:
                        clash = (tag, owner[tag], run.path.name)
                    records.append(rec)
        if clash is not None:
            notes.append(f"{name}: not joined, {clash[0]!r} is measured in both {clash[1]} and "
                         f"{clash[2]}")
            continue
        rows += [{"experiment": name, "runs": len(members), **row} for row in hook(records)]
    return rows, notes


def _hook(name: str | None, hook: str) -> Any:
    """Experiment ``name``'s registration hook ``hook``, or None (unknown or no hook)."""
    if not name:
        return None
    from flatlab.experiments import get

    try:
        return getattr(get(name), hook)
    except ConfigError:  # an experiment that is not registered (any more) has no table
        return None


def _run_labels(runs: Sequence[Run]) -> list[str]:
    """Folder names, made unique by their parent folder when two runs share a name."""
    names = [r.path.name for r in runs]
    return [f"{r.path.parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def differing_settings(runs: Sequence[Run | str | Path]) -> list[dict[str, Any]]:
    """One row per setting whose value differs between ``runs``: ``{"setting", <run>: value}``.

    The experiment name counts as a setting; a setting a run lacks shows as ``-``.
    """
    runs = [r if isinstance(r, Run) else Run.open(r) for r in runs]
    flat = [{"experiment": r.experiment, **_flatten(r.config)} for r in runs]
    labels = _run_labels(runs)
    rows = []
    for key in _columns(flat):
        values = [_fmt(f[key]) if key in f else "-" for f in flat]
        if len(set(values)) > 1:
            rows.append({"setting": key, **dict(zip(labels, values))})
    return rows


@dataclass(frozen=True)
class Comparison:
    """What ``flatlab compare`` found and wrote.

    Attributes:
        rows: one row per (run, training phase): final step, loss, accuracies, λ_max.
        settings: the settings that differ between the runs (:func:`differing_settings`).
        summaries: the experiments' own results tables (:func:`experiment_summaries`).
        joined: the experiments' tables over their runs joined (:func:`joined_tables`).
        joined_notes: why an experiment's runs were not joined.
        quick: the runs made with ``--quick`` (previews).
        out_dir: the folder holding ``compare.html``, ``compare.md`` and ``plots/``.
    """

    rows: list[dict[str, Any]]
    settings: list[dict[str, Any]]
    summaries: list[dict[str, Any]]
    quick: list[str]
    out_dir: Path
    joined: list[dict[str, Any]] = field(default_factory=list)
    joined_notes: list[str] = field(default_factory=list)

    @property
    def html_path(self) -> Path:
        return self.out_dir / "compare.html"


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Comparison:
    """Overlay the curves of several runs, tabulate their final metrics and differing settings.

    Curves are coloured by training phase and styled (line style, or marker on the eigenvalue
    plot) by run, so the legend lists phases and runs once each; a run with a single phase is
    one colour. Writes ``compare.html``, ``compare.md`` and ``plots/compare_*.png`` into
    ``out`` (default: ``./compare-<timestamp>``).

    Raises:
        ConfigError: no run folder, or a folder that is not a run folder.
    """
    if not run_dirs:
        raise ConfigError("compare needs at least one run folder")
    runs = [Run.open(d) for d in run_dirs]
    out_dir = Path(out) if out is not None else Path(f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    per_run = [_by_tag(r) for r in runs]
    labels = _run_labels(runs)
    paired = any(len(tags) > 1 for tags in per_run)
    histories: dict[plots.Label, list[dict[str, Any]]] = {}
    rows = []
    for label, by_tag in zip(labels, per_run):
        for tag, recs in by_tag.items():
            histories[(tag, label) if paired else label] = recs
            rows.append({"run": label if len(by_tag) == 1 else f"{label}/{tag}", "records": recs})
    keys = {k for recs in histories.values() for r in recs for k in r}
    acc_keys = sorted((k for k in keys if k.endswith("_acc")),
                      key=lambda k: (not k.startswith("val"), k))  # validation first
    metric_keys = ["loss", *acc_keys, *sorted(k for k in keys if k.endswith("_loss"))]
    metric_keys += ["lambda_max"] if "lambda_max" in keys else []
    for row in rows:
        recs = row.pop("records")
        row.update({"steps": _final(recs, "step"), **{k: _final(recs, k) for k in metric_keys}})
    joined, notes = joined_tables(runs)
    result = Comparison(rows, differing_settings(runs), experiment_summaries(runs),
                        [lab for lab, r in zip(labels, runs) if r.config.get("quick")], out_dir,
                        joined, notes)
    figs = [("compare_curves", plots.curves(histories, ["loss", *acc_keys[:2]]))]
    if "lambda_max" in keys:
        figs.append(("compare_eigenvalues", plots.eigenvalue_plot(histories)))
    fig_paths = []
    for name, fig in figs:
        fig_paths.append(out_dir / "plots" / f"{name}.png")
        save_png(fig, fig_paths[-1])
    _write_comparison(result, fig_paths)
    return result


def _write_comparison(c: Comparison, fig_paths: Sequence[Path]) -> None:
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>flatlab "
         f"compare</title><style>{_CSS}</style></head><body><h1>flatlab compare</h1>"]
    m = ["# flatlab compare", ""]
    if c.quick:
        note = f"{', '.join(c.quick)}: {QUICK_BANNER}"
        h.append(f"<div class=\"banner\"><strong>{html.escape(note)}</strong></div>")
        m += [f"> **{note}**", ""]
    same = "The runs have the same settings."
    h += ["<h2>Settings that differ</h2>", _html_table(c.settings) or f"<p>{same}</p>",
          "<h2>Final metrics</h2>", _html_table(c.rows)]
    m += ["## Settings that differ", "", _md_table(c.settings) or same, "",
          "## Final metrics", "", _md_table(c.rows), ""]
    if c.summaries:
        h += ["<h2>Results tables of the experiments</h2>", _html_table(c.summaries)]
        m += ["## Results tables of the experiments", "", _md_table(c.summaries), ""]
    if c.joined or c.joined_notes:
        title = "Over the runs joined"
        h += [f"<h2>{title}</h2>", *(f"<p>{html.escape(n)}</p>" for n in c.joined_notes)]
        m += [f"## {title}", "", *(f"{n}\n" for n in c.joined_notes)]
        if c.joined:
            h.append(_html_table(c.joined))
            m += [_md_table(c.joined), ""]
    h.append("<h2>Curves</h2>")
    m += ["## Curves", ""]
    for p in fig_paths:
        tag, caption = _figure(p, p.stem)
        h.append(tag)
        m += _md_figure(p.stem, str(p.relative_to(c.out_dir)), caption)
    h.append("</body></html>")
    atomic_write_text(c.out_dir / "compare.html", "\n".join(h) + "\n")
    atomic_write_text(c.out_dir / "compare.md", "\n".join(m).rstrip() + "\n")


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

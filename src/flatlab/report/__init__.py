"""flatlab.report: figures and the run report (self-contained HTML + a Markdown twin).

* :mod:`flatlab.report.plots` - ``curves`` (loss / accuracy per step, one line per label),
  ``eigenvalue_plot`` (λ_max against 2/lr and the SAM/USAM edges), ``bars`` (e.g. sharpness per
  optimizer), ``domain_bars`` (accuracy per domain and method). Agg backend, no display needed.
  Legends sit below the axes; diverged curves are clipped, marked and named by
  ``plots.caption(fig)``.
* :func:`write_report` - ``report.html`` (figures inlined as base64 PNG with their captions,
  config and results tables, no script; a banner on ``--quick`` previews) and ``report.md``
  from a run folder; ``flatlab report RUN_DIR``.
* :func:`compare_runs` - a :class:`Comparison` of several runs: the settings that differ, final
  metrics, overlayed curves; ``flatlab compare RUN_DIR...``; :func:`experiment_summaries`
  rebuilds an experiment's own results table (mean ± s.e. over seeds,
  :mod:`flatlab.report.summary`) from its run folder, and :func:`joined_tables` its table over
  several run folders joined (the flatness verdicts of a study split per task).
"""

from flatlab.report import plots
from flatlab.report.render import (
    QUICK_BANNER,
    Comparison,
    Section,
    compare_runs,
    differing_settings,
    experiment_summaries,
    figure_caption,
    format_table,
    joined_tables,
    write_report,
)

__all__ = [
    "QUICK_BANNER", "Comparison", "Section", "compare_runs", "differing_settings",
    "experiment_summaries", "figure_caption", "format_table", "joined_tables", "plots",
    "write_report",
]

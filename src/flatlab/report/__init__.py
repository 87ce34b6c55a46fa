"""flatlab.report: figures and the run report (self-contained HTML + a Markdown twin).

* :mod:`flatlab.report.plots` - ``curves`` (loss / accuracy per step, one line per label),
  ``eigenvalue_plot`` (λ_max against 2/lr and the SAM/USAM edges), ``bars`` (e.g. sharpness per
  optimizer), ``domain_bars`` (accuracy per domain and method). Agg backend, no display needed.
* :func:`write_report` - ``report.html`` (figures inlined as base64 PNG, config and results
  tables, no script) and ``report.md`` from a run folder; ``flatlab report RUN_DIR``.
* :func:`compare_runs` - overlayed curves and a final-metrics table of several runs;
  ``flatlab compare RUN_DIR...``; :func:`experiment_summaries` rebuilds an experiment's own
  results table (mean ± s.e. over seeds, :mod:`flatlab.report.summary`) from its run folder.
"""

from flatlab.report import plots
from flatlab.report.render import (
    compare_runs,
    experiment_summaries,
    format_table,
    write_report,
)

__all__ = [
    "compare_runs", "experiment_summaries", "format_table", "plots", "write_report",
]

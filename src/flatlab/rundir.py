"""The run folder: everything one ``flatlab run`` writes, in one directory.

Layout (``runs/<name>-<timestamp>/``)::

    config.json       the fully resolved config, plus the experiment name and flatlab version
    metrics.jsonl     append-only, one JSON record per logged step ({"tag", "step", ...})
    sections.json     report sections added by the experiment (title -> text/table/figures)
    plots/*.png       figures (report.html inlines them as base64)
    checkpoints/<tag>/latest.pt   the newest checkpoint of each training phase (``fit`` tag)
    done              written last: the experiment finished; holds its results as JSON
    report.html, report.md

Resuming (:meth:`Run.open` with ``resume=True``) truncates ``metrics.jsonl`` to the length it
had when the newest checkpoint was written, so records logged after that checkpoint (and lost
with the process) are replayed exactly once by the resumed training.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints its message and exits with 2."""


def _jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts as JSON accepts them; tensors become floats/lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_png(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as a 150 dpi PNG with its caption (if any), then close it."""
    import matplotlib.pyplot as plt

    caption = getattr(fig, "flatlab_caption", "")
    fig.savefig(path, dpi=150, bbox_inches="tight",
                metadata={"Description": caption} if caption else None)
    plt.close(fig)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of run folder ``path``.

    Raises:
        ConfigError: no such file, or it is damaged (truncated, not JSON, missing keys).
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"not a run folder (no config.json): {path}")
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is damaged (not valid JSON: {exc})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
            and isinstance(saved.get("experiment"), str)):
        raise ConfigError(f"{file} is damaged (no 'experiment' and 'config' entries)")
    return saved


def _read_json(path: Path, missing: Any, *, empty_ok: bool = False) -> Any:
    """JSON from ``path`` (``missing`` if absent); :class:`ConfigError` if it is damaged."""
    if not path.exists():
        return missing
    text = path.read_text(errors="replace")
    if empty_ok and not text.strip():
        return missing
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is damaged (not valid JSON: {exc})") from None


def _checkpoint_meta(path: Path) -> tuple[int, int] | None:
    """``(saved_ns, metrics_offset)`` of a checkpoint, or None if it cannot be read."""
    try:
        meta = torch.load(path, map_location="cpu", weights_only=False)["meta"]
        return int(meta["saved_ns"]), int(meta["metrics_offset"])
    except Exception:  # noqa: BLE001 - an unreadable file is never trusted
        return None


class Run:
    """A run folder with an append-only metric log, plots, checkpoints and report sections.

    Create one with :meth:`Run.create` (a fresh folder) or :meth:`Run.open` (an existing one);
    experiments receive it as their second argument. The other ranks of a data-parallel run
    hold a follower (:meth:`Run.follow`) of the folder rank 0 writes: the same methods, with
    records, sections and figures kept in memory and nothing written.

    Attributes:
        path: the folder.
        config: the resolved config (a dict, as saved in ``config.json``).
        tensorboard: a ``SummaryWriter`` when TensorBoard logging was asked for, else None.
        writes: False on a follower.
        parallel: the :class:`~flatlab.train.parallel.DataParallel` group of a run at several
            ranks (``fit`` trains data-parallel when it is set), else None.
    """

    def __init__(self, path: Path, config: dict[str, Any], *, writes: bool = True) -> None:
        self.path = Path(path).resolve()
        self.config = config
        self.tensorboard: Any = None
        self.parallel: Any = None  # the DataParallel group of a run at several ranks
        self.writes = bool(writes)
        self._records: list[dict[str, Any]] | None = None
        self._sections: list[dict[str, Any]] | None = None
        if self.writes:
            self.plots_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        else:  # a follower keeps in memory what rank 0 writes
            self._records = list(iter_records(self.metrics_path))
            self._sections = _read_json(self.path / "sections.json", [])

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, root: str | Path, name: str, config: Mapping[str, Any]) -> Run:
        """Make ``root/<name>-<YYYYmmdd-HHMMSS>[-k]/`` and write ``config.json`` into it."""
        root = Path(root)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = root / f"{name}-{stamp}"
        k = 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                k += 1
                path = root / f"{name}-{stamp}-{k}"
        from flatlab import __version__

        meta = {"experiment": name, "flatlab_version": __version__, "created": stamp}
        full = {**meta, "config": _jsonable(dict(config))}
        atomic_write_text(path / "config.json", json.dumps(full, indent=2) + "\n")
        (path / "metrics.jsonl").touch()
        return cls(path, dict(config))

    @classmethod
    def open(cls, path: str | Path, *, resume: bool = False) -> Run:
        """Open an existing run folder; ``resume=True`` prepares it to continue training."""
        path = Path(path)
        run = cls(path, read_config_json(path)["config"])
        if resume:
            run._truncate_to_newest_checkpoint()
            (path / "done").unlink(missing_ok=True)
        return run

    @classmethod
    def follow(cls, path: str | Path) -> Run:
        """Open the folder rank 0 writes, for another rank of a data-parallel run: it reads
        what is there now and never writes (records, sections, figures stay in memory)."""
        return cls(Path(path), read_config_json(path)["config"], writes=False)

    @property
    def experiment(self) -> str:
        return read_config_json(self.path)["experiment"]

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    # ------------------------------------------------------------------ metrics
    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Append one record (``record`` merged with ``fields``) to ``metrics.jsonl``.

        The line is flushed at once, so a killed process loses at most the line being written.
        """
        rec = _jsonable({**(record or {}), **fields})
        if not self.writes:
            self._records.append(rec)
            return rec
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
        if self.tensorboard is not None and "step" in rec:
            tag = rec.get("tag", "train")
            for key, value in rec.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and key != "step":
                    self.tensorboard.add_scalar(f"{tag}/{key}", value, rec["step"])
        return rec

    def metrics(self, tag: str | None = None) -> list[dict[str, Any]]:
        """All complete records of ``metrics.jsonl`` (only those of ``tag`` when given)."""
        records = iter_records(self.metrics_path) if self.writes else self._records
        return [r for r in records if tag is None or r.get("tag") == tag]

    def metrics_offset(self) -> int:
        """Current byte length of ``metrics.jsonl`` (stored in checkpoints, used by resume)."""
        if not self.writes:
            return 0
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def _truncate_to_newest_checkpoint(self) -> None:
        """Cut ``metrics.jsonl`` back to the newest valid checkpoint.

        A damaged checkpoint (truncated, unreadable) is set aside as ``latest.pt.damaged``,
        any checkpoint written after it as ``latest.pt.stale``, and the run continues from the
        newest valid checkpoint before it (phases run one after another, so the phases after that
        one are trained again). One line on stderr says so. With no valid checkpoint before
        the damage, :class:`ConfigError` is raised and nothing is changed.
        """
        valid: list[tuple[int, int, Path]] = []  # (saved_ns, metrics_offset, path)
        damaged: list[tuple[int, Path]] = []  # (mtime_ns, path)
        for ckpt in sorted(self.checkpoints_dir.glob("*/latest.pt")):
            meta = _checkpoint_meta(ckpt)
            if meta is None:
                damaged.append((ckpt.stat().st_mtime_ns, ckpt))
            else:
                valid.append((*meta, ckpt))
        if damaged:
            first_damage = min(t for t, _ in damaged)
            later = [p for t, _, p in valid if t >= first_damage]
            valid = [v for v in valid if v[0] < first_damage]
            names = ", ".join(str(p.relative_to(self.path)) for _, p in damaged)
            if not valid:
                raise ConfigError(f"cannot resume {self.path}: {names} is damaged and there is "
                                  "no earlier valid checkpoint; start the run again")
            prev = max(valid)
            sys.stderr.write(f"warning: {names} is damaged; resuming from the previous valid "
                             f"checkpoint {prev[2].relative_to(self.path)} (later phases "
                             "are trained again)\n")
            for _, p in damaged:
                os.replace(p, p.with_name(p.name + ".damaged"))
            for p in later:  # valid, but newer than the damage: retrained, kept beside
                os.replace(p, p.with_name(p.name + ".stale"))
        offset = max(valid)[1] if valid else 0
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > offset:
            with open(self.metrics_path, "r+b") as fh:
                fh.truncate(offset)

    # ------------------------------------------------------------------ plots and report
    def write_text(self, name: str, text: str) -> Path:
        """Atomically write ``text`` to the file ``name`` of the run folder (a follower rank
        writes nothing); return its path."""
        path = self.path / name
        if self.writes:
            atomic_write_text(path, text)
        return path

    def savefig(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``plots/<name>.png`` (150 dpi) and close it.

        A figure's caption (``fig.flatlab_caption``, set by :mod:`flatlab.report.plots` when it
        clipped a diverged curve) is stored as the PNG's ``Description`` text; the report
        prints it under the figure.
        """
        path = self.plots_dir / (name if name.endswith(".png") else f"{name}.png")
        if not self.writes:
            import matplotlib.pyplot as plt

            plt.close(fig)
            return path
        save_png(fig, path)
        return path

    def add_section(
        self,
        title: str,
        text: str = "",
        *,
        table: Sequence[Mapping[str, Any]] | None = None,
        figures: Sequence[str | Path] = (),
    ) -> None:
        """Add (or replace, by title) a report section: paragraphs, a table, figures.

        Args:
            title: section heading; adding the same title again replaces the section, so an
                experiment re-run by ``--resume`` never duplicates its sections.
            text: plain text; blank lines separate paragraphs.
            table: rows as dicts with the same keys (the columns, in first-row order).
            figures: PNG paths (absolute or relative to the run folder), usually from
                :meth:`savefig`.
        """
        figs = []
        for f in figures:
            p = Path(f)
            full = p.resolve() if p.is_absolute() or p.exists() else self.path / p
            try:
                figs.append(str(full.relative_to(self.path)))
            except ValueError:  # a figure outside the run folder: keep its absolute path
                figs.append(str(full))
        sections = [s for s in self.sections() if s["title"] != title]
        sections.append(
            {"title": title, "text": text, "table": _jsonable(list(table or [])), "figures": figs}
        )
        if not self.writes:
            self._sections = sections
            return
        atomic_write_text(self.path / "sections.json", json.dumps(sections, indent=2) + "\n")

    def sections(self) -> list[dict[str, Any]]:
        """The report sections added so far, in order."""
        if not self.writes:
            return list(self._sections)
        return _read_json(self.path / "sections.json", [])

    # ------------------------------------------------------------------ completion
    def mark_done(self, results: Mapping[str, Any] | None = None) -> None:
        """Write the ``done`` marker holding the experiment's headline ``results``."""
        if not self.writes:
            return
        atomic_write_text(self.path / "done", json.dumps(_jsonable(dict(results or {})), indent=2))

    @property
    def done(self) -> bool:
        return (self.path / "done").exists()

    def results(self) -> dict[str, Any]:
        """The results stored in the ``done`` marker ({} if the run has not finished)."""
        return _read_json(self.path / "done", {}, empty_ok=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the complete JSON lines of a ``metrics.jsonl`` (a torn last line is skipped)."""
    if not path.exists():
        return
    with open(path) as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue

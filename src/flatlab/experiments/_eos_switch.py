"""T7 of ``flatlab run eos``: switching SAM on and off on the digits MLP (full batch).

Runs: SAM only for the first ``early_steps`` steps then GD; GD then SAM from ``late_start``;
GD then USAM from ``late_start`` with and without a linear rho warm-up; GD and SAM throughout.
Each shares its leading phases with the others through :class:`~flatlab.experiments._eos_lab.Lab`.
Checks: early-only SAM returns to 0.95·2/η within 800 steps; late SAM comes within 10% of its
edge within 600 steps; late USAM above its edge diverges, and a rho warm-up keeps the peak loss
within 2x (the note's targets; docs/results/eos.md reports what was found).
"""

from __future__ import annotations

import math
from typing import Any

from flatlab.experiments._eos_lab import (
    Lab,
    Phase,
    Point,
    Trajectory,
    first_crossing,
    fmt,
    value_at,
    window_stats,
    yes_no,
)

__all__ = ["matched", "switching"]


def switching(cfg: Any, lab: Lab) -> tuple[list[dict], dict, dict]:
    """T7: SAM only early, SAM only late, USAM late with/without rho warm-up, SAM throughout."""
    lr, rho, T, L = cfg.lr, cfg.switch_rho, cfg.steps, cfg.late_start
    gd_edge = 2 / lr
    t = {"SAM throughout": [Phase("sam", lr, cfg.early_steps, rho),
                            Phase("sam", lr, cfg.sam_steps - cfg.early_steps, rho)],
         "SAM early only": [Phase("sam", lr, cfg.early_steps, rho),
                            Phase("gd", lr, T - cfg.early_steps)],
         "GD throughout": [Phase("gd", lr, L), Phase("gd", lr, T - L)],
         "SAM late": [Phase("gd", lr, L), Phase("sam", lr, T - L, rho)],
         "USAM late, no warm-up": [Phase("gd", lr, L), Phase("usam", lr, T - L, cfg.late_usam_rho)],
         "USAM late, rho warm-up": [Phase("gd", lr, L),
                                    Phase("usam", lr, T - L, cfg.late_usam_rho, cfg.rho_warmup)]}
    trajs = {name: lab.trajectory(ph) for name, ph in t.items()}
    rows, res = [], {}
    early = trajs["SAM early only"]
    pts = early.points(1)
    back = first_crossing(pts, 0.95)
    lam_sw = value_at(early.points(), cfg.early_steps)
    dt = back.step - cfg.early_steps if back else math.nan
    ok = back is not None and dt <= 800
    rows.append({"run": "SAM early only", "switch step": cfg.early_steps,
                 "λ at switch": fmt(lam_sw), "target": f"λ >= 0.95·2/η = {fmt(0.95 * gd_edge)}",
                 "steps to reach it": dt,
                 "final median λ (last 25%)": fmt(window_stats(pts, int(T * 0.75))["lam"]),
                 "pass": yes_no(ok) + " (<= 800)"})
    res["T7.early.steps_back"] = dt
    late = trajs["SAM late"]
    pts = late.points(1)
    hit = next((p for p in pts if p.lam <= 1.10 * p.edge), None)
    dt = hit.step - L if hit else math.nan
    fin = window_stats(pts, int(L + 0.5 * (T - L)))
    # the edge jumps with |g| at the switch, so also time the fall to 1.10 x the final edge
    down = first_crossing([Point(p.step, -p.lam, -1.10 * fin["thr"], p.loss) for p in pts])
    res["T7.late.steps_to_final_edge"] = down.step - L if down else math.nan
    rows.append({"run": "SAM late", "switch step": L,
                 "λ at switch": fmt(value_at(late.points(), L)),
                 "target": "λ <= 1.10·edge(|g_t|)",
                 "steps to reach it": f"{dt} ({res['T7.late.steps_to_final_edge']} to 1.10x "
                                      "the final median edge)",
                 "final median λ (last 25%)": f"{fmt(fin['lam'])} (edge {fmt(fin['thr'])})",
                 "pass": yes_no(hit is not None and dt <= 600) + " (<= 600)"})
    res["T7.late.steps_to_edge"] = dt
    loss_sw = trajs["GD throughout"].points(0)[-1].loss  # training loss just before the switch
    for name, warm in (("USAM late, no warm-up", 0), ("USAM late, rho warm-up", cfg.rho_warmup)):
        tr = trajs[name]
        lam_sw = value_at(tr.points(), L)
        prod = cfg.lr * lam_sw * (1 + cfg.late_usam_rho * lam_sw)
        # the first steps after the switch again, logging the loss at every step
        probe = lab.trajectory([Phase("gd", lr, L), Phase("usam", lr, min(50, T - L),
                                                          cfg.late_usam_rho, warm, log_every=1)])
        spike = max((r["loss"] for r in probe.records if r["phase"] == 1 and "loss" in r),
                    default=math.nan)
        fin = window_stats(tr.points(1), int(L + 0.75 * (T - L)))
        if tr.diverged_at is not None:
            outcome = f"diverged at step {tr.diverged_at} ({tr.diverged_at - L} after switch)"
        else:
            outcome = (f"no divergence; peak loss in 50 steps {spike:.3g} (before: "
                       f"{loss_sw:.3g}); final median λ {fmt(fin['lam'])} vs λ* {fmt(fin['thr'])}")
        if warm:
            ok, target = tr.diverged_at is None and spike <= 2 * loss_sw, "tamed: peak loss <= 2x"
        else:
            ok, target = tr.diverged_at is not None, "diverges"
        rows.append({"run": name, "switch step": L, "λ at switch": fmt(lam_sw),
                     "target": f"η λ (1+ρλ) = {fmt(prod, 2)} at switch: {target}",
                     "steps to reach it": "", "final median λ (last 25%)": outcome,
                     "pass": yes_no(ok)})
        res[f"T7.{name}.diverged"] = tr.diverged_at is not None
        res[f"T7.{name}.peak_loss_ratio"] = spike / loss_sw
    return rows, res, trajs


def matched(cfg: Any, trajs: dict[str, Trajectory]) -> list[dict]:
    """λ_max and training loss of every switching run at the same steps (nearest measurement)."""
    marks = sorted({cfg.early_steps, cfg.late_start, cfg.sam_steps, cfg.steps})
    rows = []
    for name, tr in trajs.items():
        pts = tr.points()
        row: dict[str, Any] = {"run": name}
        for m in marks:
            near = min(pts, key=lambda p: abs(p.step - m)) if pts else None
            if near is None or abs(near.step - m) > cfg.eig_every:
                row[f"λ / loss @ {m}"] = "-"
            else:
                row[f"λ / loss @ {m}"] = f"{fmt(near.lam, 2)} / {near.loss:.3g}"
        rows.append(row)
    return rows

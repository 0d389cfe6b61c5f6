"""Plots of a serving-benchmark result (PNG, matplotlib without a display): SLO attainment and finetuning
throughput against the arrival rate, one line per mode; and a timeline of one mode's run."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"coserve": dict(color="tab:red", marker="o", lw=2.2), "inference-only": dict(color="black", marker="s"),
         "finetune-only": dict(color="tab:green", ls="--")}
OTHERS = ["tab:blue", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink"]


def _styles(labels: list[str]) -> dict[str, dict]:
    """Fixed styles for the named modes; the temporal baselines take the next colours in order."""
    others = iter(OTHERS * 4)
    return {label: STYLE.get(label) or dict(color=next(others), marker="^", ls="-.") for label in labels}


def plot_sweep(result: dict, path: Path) -> Path:
    """Left: SLO attainment vs rate (Poisson lines; bursty Gamma points as hollow markers). Right: finetuning
    tokens/s vs rate; finetune-only's throughput is a dashed level."""
    points = result["points"]
    settings = result["settings"]
    fig, (slo_ax, ft_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [label for label in result["runs"] if label != "finetune-only"]
    styles = _styles(labels)
    for label in labels:
        for trace in ("poisson", "gamma"):
            curve = sorted((p for p in points if p["mode"] == label and p["trace"] == trace), key=lambda p: p["rate"])
            if not curve:
                continue
            rates = [p["rate"] for p in curve]
            style = styles[label] if trace == "poisson" else {**styles[label], "ls": "none", "mfc": "none", "ms": 9}
            name = label if trace == "poisson" else None
            slo_ax.plot(rates, [100 * (p["slo_attainment"] or 0) for p in curve], label=name, **style)
            ft_ax.plot(rates, [p["finetune_tokens_per_s"] for p in curve], label=name, **style)
    if any(p["trace"] == "gamma" for p in points):
        for ax in (slo_ax, ft_ax):
            ax.plot([], [], ls="none", marker="o", mfc="none", color="grey",
                    label=f"hollow: bursty Gamma trace (CV {result['workload']['gamma_cv']:g})")
    ft_only = [p["finetune_tokens_per_s"] for p in points if p["mode"] == "finetune-only"]
    if ft_only:
        ft_ax.axhline(ft_only[0], label="finetune-only", **STYLE["finetune-only"])
    slo_ax.axhline(99, color="grey", lw=0.8, ls=":")
    slo_ax.set(xlabel="arrival rate (requests/s)", ylabel="SLO attainment (%)", ylim=(0, 102),
               title=f"TTFT <= {settings['ttft_slo_s']:g} s and TPOT <= {1000 * settings['tpot_slo_s']:g} ms")
    ft_ax.set(xlabel="arrival rate (requests/s)", ylabel="finetuning tokens/s", title="finetuning throughput")
    for ax in (slo_ax, ft_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"coserve modes on {result['device']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(result: dict, path: Path, label: str = "coserve") -> Path:
    """One mode's whole run: requests in flight, finetuning tokens/s (over 2 s), and each request's TPOT at its
    last token (those given up as certain misses marked apart), with each rate's arrival window shaded."""
    run = result["runs"].get(label) or next(iter(result["runs"].values()))
    tl = run["timeline"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 7.5), sharex=True)
    t = [row[0] for row in tl]
    axes[0].plot(t, [row[1] for row in tl], color="tab:blue")
    axes[0].set_ylabel("requests in flight")
    rate_t, rate_v = [], []
    for i, row in enumerate(tl):
        j = next((k for k in range(i, -1, -1) if row[0] - tl[k][0] >= 2.0), None)
        if j is not None:
            rate_t.append(row[0])
            rate_v.append((row[2] - tl[j][2]) / (row[0] - tl[j][0]))
    axes[1].plot(rate_t, rate_v, color="tab:red")
    axes[1].set_ylabel("finetuning tokens/s")
    col = {c: i for i, c in enumerate(run["record_columns"])}
    for missed, kw in ((False, dict(s=6, color="tab:purple", label="finished")),
                       (True, dict(s=14, color="tab:red", marker="x", label="given up (TPOT so far)"))):
        rows = [r for r in run["records"] if r[col["tpot_s"]] is not None and r[col["last_token_s"]] is not None
                and (r[col["cancelled_as_miss"]] if missed else r[col["finished"]])]
        if rows:
            axes[2].scatter([r[col["last_token_s"]] for r in rows], [1000 * r[col["tpot_s"]] for r in rows], **kw)
    axes[2].axhline(1000 * result["settings"]["tpot_slo_s"], color="grey", ls=":", label="TPOT SLO")
    axes[2].set(ylabel="TPOT (ms)", xlabel="seconds since the mode's engine was ready")
    axes[2].legend(fontsize=8)
    for trace, rate, t0, t1 in run["windows"]:
        for ax in axes:
            ax.axvspan(t0, t1, color="tab:orange" if trace == "gamma" else "tab:grey", alpha=0.08)
        axes[0].annotate(f"{rate:g}/s" + (" G" if trace == "gamma" else ""), (t0, 1),
                         xycoords=("data", "axes fraction"), fontsize=7, va="top")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['label']}: one run ({result['device']}, {result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

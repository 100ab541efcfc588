#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Draws the figures of a `vfio-mig bench --json` report as one PNG.

Usage: bench_plot.py REPORT.json OUT.png

One horizontal bar per figure: the median ratio (subject against the baseline measured in the
same run), a whisker from the smallest to the largest run, the target as a tick, green when the
median meets it, red when not, grey for diagnostic figures without a target of their own.
Memory figures whose target is an absolute bound (subject <= 64 MiB) get a panel of their own
in MiB.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        report = json.load(f)
    figs = report["figures"]
    ratio_figs = [f for f in figs if not (f["target"] and f["target"]["on_subject"])]
    abs_figs = [f for f in figs if f["target"] and f["target"]["on_subject"]]

    rows = len(ratio_figs) + (len(abs_figs) + 2 if abs_figs else 0)
    fig, axes = plt.subplots(
        2 if abs_figs else 1,
        1,
        figsize=(11, 0.34 * rows + 2.2),
        gridspec_kw={"height_ratios": [max(len(ratio_figs), 1), max(len(abs_figs), 1) + 1]}
        if abs_figs
        else None,
        squeeze=False,
    )

    def color(f):
        if f["met"] is None:
            return "#9e9e9e"
        return "#2e7d32" if f["met"] else "#c62828"

    ax = axes[0][0]
    labels = [f"[{f['target_no'] or '-'}] {f['id']}" for f in ratio_figs]
    ys = list(range(len(ratio_figs)))[::-1]
    for y, f in zip(ys, ratio_figs):
        r = f["ratio"]
        ax.barh(y, r["median"], color=color(f), alpha=0.8, height=0.6)
        ax.plot([r["min"], r["max"]], [y, y], color="black", linewidth=1)
        if f["target"]:
            t = f["target"]["value"]
            ax.plot([t, t], [y - 0.4, y + 0.4], color="black", linewidth=2.5)
        ax.text(
            max(r["max"], r["median"]) + 0.02,
            y,
            f"{r['median']:.2f}",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="#555555", linestyle=":", linewidth=1)
    ax.set_xlabel(
        "ratio (median bar, min..max whisker, target tick): throughput subject/baseline; "
        "downtime measured/bound; multi sequential/parallel",
        fontsize=8,
    )
    m = report["machine"]
    ax.set_title(
        f"vfio-mig bench, {report['date']}: {m['cpu']}, {m['cpus']} CPUs, load {m['loadavg']}, "
        f"{report['reps']} interleaved runs",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)

    if abs_figs:
        ax2 = axes[1][0]
        ys = list(range(len(abs_figs)))[::-1]
        for y, f in zip(ys, abs_figs):
            ax2.barh(y + 0.2, f["subject"]["median"], height=0.38, color=color(f),
                     label="engine" if y == ys[0] else None)
            ax2.barh(y - 0.2, f["baseline"]["median"], height=0.38, color="#90a4ae",
                     label="whole state in memory" if y == ys[0] else None)
            ax2.text(f["subject"]["median"] * 1.1, y + 0.2, f"{f['subject']['median']:.1f}",
                     va="center", fontsize=7)
            ax2.text(f["baseline"]["median"] * 1.1, y - 0.2, f"{f['baseline']['median']:.0f}",
                     va="center", fontsize=7)
        limit = abs_figs[0]["target"]["value"]
        ax2.axvline(limit, color="black", linewidth=2, label=f"target {limit:.0f} MiB")
        ax2.set_xscale("log")
        top = max(f["baseline"]["median"] for f in abs_figs)
        ax2.set_xlim(right=top * 4)
        ax2.set_yticks(ys)
        ax2.set_yticklabels([f"[3] {f['id']}" for f in abs_figs], fontsize=7)
        ax2.set_xlabel("peak RSS, MiB (log scale)", fontsize=8)
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax2.grid(axis="x", alpha=0.3)

    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Median of several trellis-bench runs, one markdown row per scenario.

    scripts/bench-median.py RUN_DIR RUN_DIR ...

Each RUN_DIR is a `--out` directory of one full run (its <scenario>.json
files). For every scenario with a target, prints each run's headline figure
(the one its target is about), the median over the runs and how many runs met
the target. The machine is noisy: quote the median and the spread, not one
run's figure.
"""

import json
import statistics
import sys
from pathlib import Path


def headline(d):
    """The figure a scenario's target is judged by, and how to print it."""
    name = d["scenario"]
    if d.get("held_rps") is not None:
        return d["held_rps"], "{:.0f} req/s"
    if d.get("p99_overhead_us") is not None and name.startswith("llm"):
        return d["p99_overhead_us"] / 1000, "+{:.2f} ms p99"
    if d.get("p50_overhead_us") is not None:
        return d["p50_overhead_us"] / 1000, "+{:.2f} ms p50"
    rss = (d.get("rss") or {}).get("at_target_mb")
    if rss is not None:
        return rss, "{:.0f} MB"
    if d.get("target_rps_ratio") is not None:
        return d["rps_ratio"], "{:.2f}×"
    if d.get("target_p50_ratio") is not None:
        # Judged by p50 and p99 both: the worse of the two.
        if d.get("target_p99_ratio") is not None:
            return max(d["p50_ratio"], d["p99_ratio"]), "{:.2f}× (max p50/p99)"
        return d["p50_ratio"], "{:.2f}× p50"
    if d.get("target_p99_ratio") is not None:
        return d["p99_ratio"], "{:.2f}× p99"
    if d.get("rps_ratio") is not None:
        return d["rps_ratio"], "{:.2f}×"
    return None, None


def main(dirs):
    runs = [
        {p.stem: json.loads(p.read_text()) for p in Path(d).glob("*.json")}
        for d in dirs
    ]
    names = [n for n in runs[0] if all(n in r for r in runs)]
    # The run's own order (summary.md's first table), else by name.
    summary = Path(dirs[0], "summary.md")
    order = []
    if summary.exists():
        for line in summary.read_text().splitlines():
            cell = line.split("|")[1].strip() if line.startswith("| ") else ""
            if cell in runs[0] and cell not in order:
                order.append(cell)
    names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
    print("| scenario | target | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
          + " | median | met |")
    print("|---|---|" + "---:|" * len(runs) + "---:|---|")
    for n in names:
        ds = [r[n] for r in runs]
        if not ds[0].get("target"):
            continue
        vals = []
        fmt = None
        for d in ds:
            v, fmt = headline(d)
            vals.append(v)
        if fmt is None or any(v is None for v in vals):
            continue
        met = sum(1 for d in ds if d.get("met"))
        cells = " | ".join(fmt.format(v) for v in vals)
        print(f"| {n} | {ds[0]['target']} | {cells} | "
              f"{fmt.format(statistics.median(vals))} | {met}/{len(ds)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])

"""PNG timeline of a scenario: new connections per 10 ms window, event marked.

matplotlib with the Agg backend (no display needed); imported lazily so the
rest of the lab works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anycast_lb.lab.results import WINDOW_S, windows


def timeline(path: Path, traffic: dict[str, Any], result: dict[str, Any]) -> None:
    """Write the plot for one run to ``path``. x axis: ms from the event
    (from the stream's start when the scenario has no event)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    event_s = result.get("event_at") or 0.0
    bins = windows(traffic["new"])
    xs = sorted(bins)
    x_ms = [(i * WINDOW_S - event_s) * 1000 for i in xs]
    ok = [bins[i][0] for i in xs]
    bad = [bins[i][1] for i in xs]
    fig, ax = plt.subplots(figsize=(11, 4), dpi=100)
    width = WINDOW_S * 1000
    ax.bar(x_ms, ok, width=width, align="edge", color="#2b8a3e", label="new connections ok")
    ax.bar(x_ms, bad, width=width, align="edge", bottom=ok, color="#e03131",
           label="new connections failed")
    broken = [(c["broken_at"] - event_s) * 1000 for c in traffic["long"]
              if c.get("broken_at") is not None]
    if broken:
        ax.plot(broken, [max(ok + [1]) * 1.05] * len(broken), "v", color="#862e9c",
                label=f"long-lived connection broken ({len(broken)})")
    if result.get("event_at") is not None:
        ax.axvline(0, color="black", linestyle="--", label="event")
        if result.get("fib_converged_ms") is not None:
            ax.axvline(result["fib_converged_ms"], color="#1971c2", linestyle=":",
                       label=f"FIB converged (+{result['fib_converged_ms']:.0f} ms)")
    title = (f"{result['scenario']}: failed {result['new_connections_failed']}"
             f"/{result['new_connections_total']} new, broken "
             f"{result['established_broken']}/{result['established_total']} established"
             f" - {'PASS' if result.get('pass') else 'FAIL'}")
    ax.set_title(title)
    ax.set_xlabel("ms from event" if result.get("event_at") is not None else "ms from start")
    ax.set_ylabel("connections per 10 ms window")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

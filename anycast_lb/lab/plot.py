"""PNG timelines: new connections per 10 ms window (failover scenarios) and
long-lived flows alive and broken (flow scenarios), the event marked.

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
    if result.get("plot_note"):
        title += f"\n{result['plot_note']}"
    ax.set_title(title, fontsize=10 if result.get("plot_note") else None)
    ax.set_xlabel("ms from event" if result.get("event_at") is not None else "ms from start")
    ax.set_ylabel("connections per 10 ms window")
    ax.legend(loc="lower left", fontsize=8)
    routes = result.get("route_count_timeline")
    if routes:
        # Abuse scenarios: the router's next hops for the VIP over time.
        right = ax.twinx()
        end_ms = max(x_ms + [0.0]) + width
        xs_r = [max(ms, x_ms[0] if x_ms else ms) for ms, _ in routes] + [end_ms]
        ys_r = [n for _, n in routes] + [routes[-1][1]]
        right.step(xs_r, ys_r, where="post", color="#1971c2", linewidth=2,
                   label="router next hops for the VIP")
        right.set_ylim(-0.2, max(ys_r) + 0.5)
        right.set_ylabel("next hops in the router's FIB")
        right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def flows_timeline(path: Path, traffic: dict[str, Any], result: dict[str, Any],
                   node_of_peer: dict[str, str]) -> None:
    """Write the plot of a long-lived flow run to ``path``: established flows
    alive per owner node over time (top) and flow failures per 20 ms window
    by kind, the victim's own vs collateral (bottom; a hang shows twice: when
    the echo was overdue and when a RST or FIN ended it); x axis: ms from
    the event, with the event and the FIB changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    event_s = float(result["event_at"])
    flows = [f for f in traffic["flows"] if f["open_s"] is not None]
    owners = sorted({node_of_peer.get(f["peer"], f["peer"]) for f in flows})
    end_s = max([f["failed_s"] or 0.0 for f in flows] + [f.get("late_s") or 0.0 for f in flows]
                + [f["last_ok_s"] or 0.0 for f in flows] + [event_s])
    start_s = min([f["open_s"] for f in flows] + [event_s])
    step = 0.01
    grid = [start_s + i * step for i in range(int((end_s - start_s) / step) + 2)]
    x_ms = [(t - event_s) * 1000 for t in grid]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for owner in owners:
        mine = [f for f in flows if node_of_peer.get(f["peer"], f["peer"]) == owner]
        alive = [sum(1 for f in mine if f["open_s"] <= t
                     and (f["failed_s"] is None or f["failed_s"] > t)) for t in grid]
        style = "-" if owner != result["victim"] else "--"
        top.plot(x_ms, alive, style, label=f"{owner} flows alive"
                 + (" (victim)" if owner == result["victim"] else ""))
    top.set_ylabel("established flows alive")
    width_s = 0.02
    colours = {"reset": "#e03131", "eof": "#f08c00", "hang": "#862e9c", "bad-echo": "#495057",
               "reset after hang": "#ff8787", "eof after hang": "#ffc078"}
    # (time s, what, victim's own?): a hang, and the RST or FIN that ended it.
    marks: list[tuple[float, str, bool]] = []
    for f in flows:
        if f["failed_s"] is None:
            continue
        own = node_of_peer.get(f["peer"], f["peer"]) == result["victim"]
        marks.append((f["failed_s"], f["kind"], own))
        if f["kind"] == "hang" and f.get("late_s") is not None:
            marks.append((f["late_s"], f"{f['late_kind']} after hang", own))
    kinds = sorted({what for _, what, _ in marks})
    bins: dict[tuple[str, bool], dict[int, int]] = {}
    for at, what, own in marks:
        cell = bins.setdefault((what, own), {})
        i = int((at - event_s) // width_s)
        cell[i] = cell.get(i, 0) + 1
    bottom_sum: dict[int, int] = {}
    for kind in kinds:
        for own in (True, False):
            counts = bins.get((kind, own))
            if not counts:
                continue
            idx = sorted(counts)
            base = [bottom_sum.get(i, 0) for i in idx]
            bottom.bar([i * width_s * 1000 for i in idx], [counts[i] for i in idx],
                       width=width_s * 1000, align="edge", bottom=base,
                       color=colours.get(kind, "#868e96"), alpha=1.0 if own else 0.45,
                       label=f"{kind}, {'victim' if own else 'collateral'}")
            for i in idx:
                bottom_sum[i] = bottom_sum.get(i, 0) + counts[i]
    bottom.set_ylabel("flow failures per 20 ms")
    bottom.set_xlabel("ms from event")
    for ax in (top, bottom):
        ax.axvline(0, color="black", linestyle="--", label="event" if ax is top else None)
        for change in result.get("fib_changes", []):
            if change["ms"] is not None and change["ms"] > 0:
                ax.axvline(change["ms"], color="#1971c2", linestyle=":", linewidth=1)
    top.plot([], [], color="#1971c2", linestyle=":", label="FIB change")
    fs = "flow survival" if result.get("flow_survival") else "plain anycast"
    title = (f"{result['scenario']} ({fs}): broken {result['established_broken']}"
             f"/{result['established_total']} (victim {result['victim_broken']}, "
             f"collateral {result['collateral_broken']})")
    reset = result.get("dead_owner_reset_ms")
    if reset and reset.get("max") is not None:
        title += f", dead owner's RST median {reset['median']:.0f} / max {reset['max']:.0f} ms"
    top.set_title(title + f" - {'PASS' if result.get('pass') else 'FAIL'}", fontsize=10)
    top.legend(loc="lower left", fontsize=8)
    if kinds:
        bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

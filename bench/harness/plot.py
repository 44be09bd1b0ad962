"""The PNG next to each results table: deqkern's speed-up over each peer, per problem size, as grouped bars.

panels: {panel title: {problem size label: {peer name: speed-up}}}, speed-up = peer time / deqkern time (> 1:
deqkern is faster). One panel per section of a script (forward solve, training step, ...), since the peers differ
between sections. The y axis is logarithmic: speed-ups from 0.5x to 100x share one chart.
"""
import textwrap
from pathlib import Path
from typing import Dict, Optional

Panels = Dict[str, Dict[str, Dict[str, Optional[float]]]]


def speedup_chart(path: Path, panels: Panels, title: str, device_name: str, date_utc: str,
                  ylabel: str = "deqkern speed-up\n(peer time / deqkern time)") -> Optional[Path]:
    """Writes the chart to path; returns path, or None (with a note printed) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must be chosen before pyplot is imported
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path} is not written (pip install matplotlib)")
        return None
    panels = {name: groups for name, groups in panels.items() if _has_values(groups)}
    peers = list(dict.fromkeys(p for groups in panels.values() for bars in groups.values() for p in bars))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(peers)}
    width = max(9.0, min(18.0, 4.0 + 0.55 * max((_bar_count(g) for g in panels.values()), default=0)))
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(width, 1.4 + 3.6 * max(1, len(panels))),
                             squeeze=False)
    for ax, (name, groups) in zip(axes[:, 0], panels.items()):
        _draw_panel(ax, name, groups, colors, ylabel)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no timed peer rows (every peer failed or was skipped)", ha="center",
                        transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    fig.suptitle(f"{title}\n{device_name}, {date_utc} UTC", fontsize=11)
    fig.text(0.5, 0.005, "bar = peer median time / deqkern median time (above 1x: deqkern is faster); "
             "dashed line: same speed; log scale", ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _has_values(groups) -> bool:
    return any(v for bars in groups.values() for v in bars.values())


def _bar_count(groups) -> int:
    return sum(len(bars) + 1 for bars in groups.values())


def _draw_panel(ax, name, groups, colors, ylabel):
    """Groups side by side, one bar per peer inside a group, each bar labelled with its value."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    x, ticks, labels, drawn = 0.0, [], [], set()
    for size_label, bars in groups.items():
        bars = {peer: v for peer, v in bars.items() if v}
        start = x
        for peer, value in bars.items():
            ax.bar(x, value, width=0.9, color=colors[peer], label=None if peer in drawn else peer)
            label = f"{value:.0f}x" if value >= 10 else f"{value:.2g}x"
            ax.annotate(label, (x, value), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
            drawn.add(peer)
            x += 1.0
        ticks.append((start + x - 1.0) / 2)
        labels.append(size_label)
        x += 1.0  # gap between problem sizes
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="y", which="major", linewidth=0.3, alpha=0.5)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(textwrap.fill(name, 90), fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

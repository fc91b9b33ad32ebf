"""The progress plot, as autoresearch draws it, with the runs behind each score: every run a small
dot, each experiment's mean a large one, the running best a step line inside its uncertainty band
(the standard error of the best's mean)."""

from __future__ import annotations

import io

COLORS = {"keep": "#2e7d32", "discard": "#9e9e9e"}
CRASH_COLOR = "#c62828"


def progress_png(tag: str, points: list[dict]) -> bytes:
    # Imported here: matplotlib costs seconds at import, and most processes never plot.
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    scored = [p for p in points if p["val_bpb"] is not None and p["status"] in COLORS]
    replicated = [(p["n"], value) for p in scored if len(p.get("runs", ())) > 1 for value in p["runs"]]
    if replicated:
        ax.scatter([n for n, _ in replicated], [v for _, v in replicated], s=8, color="#616161", alpha=0.5,
                   label="single runs", zorder=2)
    for status, color in COLORS.items():
        chosen = [p for p in scored if p["status"] == status]
        ax.scatter([p["n"] for p in chosen], [p["val_bpb"] for p in chosen], s=28, color=color,
                   label=f"{status} ({len(chosen)})", zorder=3)
    crashes = [p for p in points if p["status"] not in COLORS]
    if crashes and scored:
        top = max(p["val_bpb"] for p in scored)
        ax.scatter([p["n"] for p in crashes], [top] * len(crashes), marker="x", color=CRASH_COLOR,
                   label=f"crash ({len(crashes)})", zorder=3)
    best = [p for p in points if p["best"] is not None]
    if best:
        xs = [p["n"] for p in best] + ([points[-1]["n"]] if points[-1]["n"] != best[-1]["n"] else [])
        ys = [p["best"] for p in best] + ([best[-1]["best"]] if len(xs) > len(best) else [])
        ax.step(xs, ys, where="post", color=COLORS["keep"], linewidth=1.5, label="running best")
        errors = [p["best_stderr"] or 0.0 for p in best] + ([best[-1]["best_stderr"] or 0.0] if len(xs) > len(best)
                                                            else [])
        if any(errors):
            ax.fill_between(xs, [y - e for y, e in zip(ys, errors, strict=True)],
                            [y + e for y, e in zip(ys, errors, strict=True)], step="post", color=COLORS["keep"],
                            alpha=0.15, label="best ± its standard error")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch/{tag}: {len(points)} experiments")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(loc="upper right")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

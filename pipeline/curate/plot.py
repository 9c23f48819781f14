"""The trade-off plot of `sdedit-batch eval`: one point per t0, faithfulness against realism
(KID) and against diversity, as in the paper's figure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["tradeoff_png"]


def tradeoff_png(result: Mapping[str, Any], path: str) -> bool:
    """Write the plot of `evaluate`'s `result` to the PNG at `path`; False (nothing written) when
    there is neither KID nor diversity to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_t0"]
    panels = [(name, label) for name, label in (
        ("kid", "KID (lower = more realistic)"),
        ("diversity_across", "diversity (mean CLIP cosine distance)"))
        if any(r.get(name) is not None for r in rows)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    for ax, (name, label) in zip(axes[0], panels, strict=True):
        points = [(r["faithfulness_l2"], r[name], r["t0"]) for r in rows
                  if r.get(name) is not None]
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, "-o", color="#3465a4")
        for x, y, t0 in points:
            ax.annotate(f"t0={t0:g}", (x, y), textcoords="offset points", xytext=(6, 4),
                        fontsize=9)
        ax.set_xlabel("faithfulness: L2 to the guide (0-255, lower = closer)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    features = result.get("features", {}).get("kind")
    title = f"{result['output']}: {result['images']} outputs" + \
        (f"\nKID on {features} features against {result['reference']['images']} reference "
         "images" if "reference" in result else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""The advisor's figure: predicted decode tokens/s against tp, one line per hardware profile (matplotlib,
the ``plot`` extra). Points whose plan does not fit the profile's memory are drawn hollow; the
recommended tp of each profile is ringed.

Invariant: writes exactly the one file it is given, nothing else (the Agg backend: no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tpcompile.cost.advisor import Row
from tpcompile.errors import UsageError


def plot_rows(rows: Sequence[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'tpcompile[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    profiles = list(dict.fromkeys(r.prediction.profile for r in rows))
    for name in profiles:
        mine = [r for r in rows if r.prediction.profile == name]
        tps = [r.prediction.tp for r in mine]
        speed = [r.prediction.decode_tokens_per_s for r in mine]
        suffix = " (predicted)" if mine[0].predicted_hardware else " (measured host)"
        (line,) = ax.plot(tps, speed, "-", label=name + suffix)
        for r in mine:
            p = r.prediction
            face = line.get_color() if p.fits else "none"
            ax.plot([p.tp], [p.decode_tokens_per_s], "o", color=line.get_color(), markerfacecolor=face)
            if r.recommended:
                ax.plot(
                    [p.tp],
                    [p.decode_tokens_per_s],
                    "o",
                    markersize=14,
                    markerfacecolor="none",
                    color=line.get_color(),
                )
    all_tp = sorted({r.prediction.tp for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_tp, [str(t) for t in all_tp])
    ax.set_xlabel("tensor-parallel ranks (tp)")
    ax.set_ylabel("decode tokens/s, batch 1 (predicted)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="hollow: does not fit; ringed: recommended", title_fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as err:
        raise UsageError(f"cannot write the plot {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)

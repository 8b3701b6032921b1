"""Plots of an evaluation: the per-pair median rTRE by stage, by tissue, and before vs after registration.

Drawn with Matplotlib's Agg canvas on figures that pyplot never sees, so no display and no global state are involved.
rTRE axes are logarithmic: ANHIR scores span orders of magnitude (0.1 unregistered, 0.001 well registered).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from ..io.slide_io import atomic_path

__all__ = ["save_evaluation_plots"]

# A log axis cannot show 0 (a perfect registration): such scores are drawn at this floor instead.
RTRE_FLOOR = 1e-6
_COLOURS = ("tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown")


def save_evaluation_plots(output_dir: str | Path, medians: dict[str, np.ndarray], tissues: Sequence[str]) -> None:
    """Write ``rtre-by-stage.png``, ``rtre-by-tissue.png`` and ``rtre-before-after.png`` into ``output_dir``.

    Args:
        output_dir: where the PNGs go (each written atomically).
        medians: per stage, in order (``initial`` first, the final stage last), the ``(P,)`` per-pair median rTRE
            (unitless) of the same ``P >= 1`` pairs.
        tissues: ``(P,)`` tissue of each pair.
    """
    stages = list(medians)
    values = {stage: np.maximum(np.asarray(medians[stage], dtype=np.float64), RTRE_FLOOR) for stage in stages}
    tissue_of = np.asarray(tissues)
    names = sorted(set(tissues))
    output_dir = Path(output_dir)

    figure, axes = _figure(max(4.0, 1.2 * len(stages) + 1))
    axes.boxplot([values[stage] for stage in stages], tick_labels=stages, medianprops={"color": "black"})
    _log_axes(axes, "y")
    axes.set(ylabel="median rTRE per pair", title=f"Median rTRE by stage ({len(tissues)} pairs)")
    _save(figure, output_dir / "rtre-by-stage.png")

    # one group of boxes per tissue, one box per stage within the group
    figure, axes = _figure(max(5.0, (len(stages) * 0.5 + 0.6) * len(names) + 1.5))
    width = 0.8 / len(stages)
    for index, stage in enumerate(stages):
        positions = np.arange(len(names)) + (index - (len(stages) - 1) / 2) * width
        boxes = axes.boxplot(
            [values[stage][tissue_of == name] for name in names],
            positions=positions,
            widths=width * 0.9,
            patch_artist=True,
            manage_ticks=False,
            medianprops={"color": "black"},
        )
        for box in boxes["boxes"]:
            box.set_facecolor(_COLOURS[index % len(_COLOURS)])
    axes.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    _log_axes(axes, "y")
    axes.set(ylabel="median rTRE per pair", title="Median rTRE by tissue and stage")
    handles = [Patch(facecolor=_COLOURS[i % len(_COLOURS)], label=stage) for i, stage in enumerate(stages)]
    axes.legend(handles=handles, fontsize="small")
    _save(figure, output_dir / "rtre-by-tissue.png")

    before, after = values[stages[0]], values[stages[-1]]
    figure, axes = _figure(5.0)
    for name in names:
        chosen = tissue_of == name
        axes.scatter(before[chosen], after[chosen], s=18, label=name)
    limits = (min(before.min(), after.min()) / 2, max(before.max(), after.max()) * 2)
    axes.plot(limits, limits, color="black", linewidth=0.8, label="no change (y = x)")
    _log_axes(axes, "xy")
    axes.set(xlim=limits, ylim=limits, aspect="equal")
    axes.set(xlabel=f"median rTRE, {stages[0]}", ylabel=f"median rTRE, {stages[-1]}")
    axes.set_title("Per pair: below the line = improved")
    axes.legend(fontsize="small")
    _save(figure, output_dir / "rtre-before-after.png")


def _figure(width: float) -> tuple[Figure, Axes]:
    """A figure with one axes, ``width`` inches wide, attached to the Agg canvas."""
    figure = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _log_axes(axes: Axes, which: str) -> None:
    """Logarithmic ``x`` and/or ``y`` axes. An x axis is labelled at the decades only: on a range of about one
    decade Matplotlib also labels minor ticks, and side by side their labels overlap."""
    for name in which:
        axes.set(**{f"{name}scale": "log"})
    if "x" in which:
        axes.xaxis.set_minor_formatter(NullFormatter())


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)

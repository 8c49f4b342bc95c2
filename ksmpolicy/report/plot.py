"""The sharing map as a picture: the VM x VM heatmap, ordered by group (matplotlib, optional)."""

from __future__ import annotations

import io
from pathlib import Path

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import write_atomic
from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.report.sharing import Sharing

INSTALL_HINT = (
    "drawing needs matplotlib: apt install python3-matplotlib, or pip install 'ksmpolicy[plot]'"
)


def heatmap(
    sharing: Sharing,
    path: Path,
    *,
    title: str = "KSM pages shared by each pair of VMs\n(zero pages left out; groups framed)",
) -> None:
    """Write a PNG: MiB of content both VMs of a pair map, zero pages left out; groups framed."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
        from matplotlib.patches import Rectangle  # noqa: PLC0415
    except ImportError:
        raise KsmPolicyError(INSTALL_HINT) from None
    vms = sorted(sharing.vms, key=lambda v: (v.group is None, v.group or "", v.name))
    if not vms:
        raise KsmPolicyError("no VM maps any KSM page: nothing to draw")
    where: dict[int | None, int] = {
        v.pid: i for i, v in enumerate(vms)
    }  # by process: two VMs may share a name
    grid = np.zeros((len(vms), len(vms)))
    for pair in sharing.pairs:
        i, j = where.get(pair.a_pid), where.get(pair.b_pid)
        if i is not None and j is not None:
            grid[i, j] = grid[j, i] = pair.shared_pages * PAGE_SIZE / 2**20
    np.fill_diagonal(grid, np.nan)
    labels = [f"{v.name} ({v.group or '-'})" for v in vms]
    cells = max(3.0, min(14.0, 0.4 * len(vms)))  # the matrix, in inches
    margin = min(4.5, 0.075 * max(len(label) for label in labels))  # room for the labels
    figure, axes = plt.subplots(
        figsize=(cells + margin + 1.6, cells + margin + 0.6), layout="constrained"
    )
    image = axes.imshow(grid, cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(vms)), labels, rotation=90, fontsize=8)
    axes.set_yticks(range(len(vms)), labels, fontsize=8)
    if len(vms) <= 12:  # few enough to print each figure
        top = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
        for (i, j), value in np.ndenumerate(grid):
            if i != j:
                colour = "black" if value > 0.6 * top else "white"
                axes.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color=colour)
    start = 0
    for index in range(1, len(vms) + 1):
        if index == len(vms) or vms[index].group != vms[start].group:
            axes.add_patch(
                Rectangle(
                    (start - 0.5, start - 0.5),
                    index - start,
                    index - start,
                    fill=False,
                    edgecolor="white",
                    linewidth=1.5,
                )
            )
            start = index
    figure.colorbar(image, ax=axes, label="MiB of KSM pages both map", shrink=0.8)
    axes.set_title(title, fontsize=10)
    image_file = io.BytesIO()
    figure.savefig(image_file, dpi=110, format=path.suffix[1:].lower() or "png")
    plt.close(figure)
    try:  # a new file beside it, renamed over it: a symlink planted at `path` is never followed
        write_atomic(path, image_file.getvalue(), 0o644)
    except OSError as exc:
        raise KsmPolicyError(f"cannot write {path}: {exc.strerror or exc}") from None

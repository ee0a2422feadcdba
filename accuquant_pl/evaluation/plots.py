"""Error-accumulation plot: per-step error (on FP states) and accumulated error (along the model's own rollout)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from accuquant_pl.io import atomic_path


def plot_error_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                      title: str = "Quantization error along the DDIM trajectory") -> None:
    """One line pair per model: dashed = per-step error of the model output on FP states (no accumulation),
    solid = MSE of the model's own state against the FP state after each step (accumulated). Log scale,
    x = denoising step (0 = first, pure noise)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, (per_step, accumulated)) in enumerate(curves.items()):
        color = f"C{i}"
        ax_step.plot(range(len(per_step)), per_step, "--", color=color, label=name)
        ax_acc.plot(range(1, len(accumulated) + 1), accumulated, "-", color=color, label=name)
    # log scale shows the orders of magnitude between early and late steps; an all-zero curve (FP vs itself) has none
    scale = "log" if any(v > 0 for ps, acc in curves.values() for v in (*ps, *acc)) else "linear"
    ax_step.set(title="per-step: model-output MSE on FP states", xlabel="denoising step", ylabel="MSE", yscale=scale)
    ax_acc.set(title="accumulated: own state vs FP state", xlabel="denoising step", ylabel="MSE", yscale=scale)
    for ax in (ax_step, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

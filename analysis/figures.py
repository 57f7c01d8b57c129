"""Figures from the tidy frames: accuracy curves, gain heat maps, layer-wise inertia.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so they render
headless on any machine and never touch a notebook's backend. Every ``*_figure`` function
returns the Figure; :func:`save` writes it as PNG.

Every method present gets its line (and its inertia panel), named by its full label; FedAvg is
black, a LIPS hand-out is dashed. A method with no value for a metric (``acc_global`` of
local-only, which has no global model) or no layer metrics simply has no line or panel.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure

from analysis.frames import Table
from analysis.loaders import load
from analysis.methods import label_sort_key
from analysis.tables import gain_grid, lips_bases

ELIGIBLE_COLOUR = "tab:red"
FEDAVG_COLOUR = "black"
SPARSE_COLOUR = "tab:red"
SPARSE_LABEL = "sparse hand-out"
FREEZE_LABEL = "freeze fired"  # the mark of a ``handout: freeze`` run's firing rounds


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", format="png")
    return path


def _wrap(text: str, width: int = 55) -> str:
    return textwrap.fill(text, width)


def _grid(count: int, width: float, height: float, ncols: int = 3) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _method_sort(methods: Sequence[str]) -> list[str]:
    return sorted(dict.fromkeys(methods), key=label_sort_key)


def _cycle(count: int = 10) -> list:
    from matplotlib import colormaps

    if count > 10:  # more methods than tab10 tells apart
        return [colormaps["tab20"](i) for i in range(20)] * (count // 20 + 1)
    return [colormaps["tab10"](i) for i in range(10)]


def _colours(methods: Sequence[str]) -> dict[str, object]:
    others = [m for m in methods if m != "fedavg"]
    out: dict[str, object] = dict(zip(others, _cycle(len(others)), strict=False))
    out["fedavg"] = FEDAVG_COLOUR
    return out


def _style(method: str) -> str:
    return "--" if "+" in method else "-"


# ----- accuracy versus round -------------------------------------------------------------------
def curve_stats(rounds: pd.DataFrame, metric: str = "acc_global",
                statuses: Sequence[str] = ("finished",)) -> pd.DataFrame:
    """Mean, std and seed count of ``metric`` per setting, method and evaluated round."""
    rows = rounds[rounds["status"].isin(statuses)] if "status" in rounds else rounds
    if "evaluated" in rows:
        rows = rows[rows["evaluated"].astype(bool)]
    rows = rows.dropna(subset=[metric]) if metric in rows else rows.iloc[0:0]
    if rows.empty:
        return pd.DataFrame(columns=["setting", "method", "round", "mean", "std", "seeds"])
    per_seed = rows.groupby(["setting", "method", "seed", "round"])[metric].mean().reset_index()
    stats = per_seed.groupby(["setting", "method", "round"])[metric].agg(["mean", "std", "count"])
    return stats.rename(columns={"count": "seeds"}).reset_index()


def curves_figure(rounds: pd.DataFrame, metric: str = "acc_global",
                  statuses: Sequence[str] = ("finished",),
                  windows: Mapping[str, int] | None = None) -> Figure | None:
    """Accuracy versus round, one axis per setting, one line per method, band = ± std.

    Methods without a value of ``metric`` (all NaN) have no line; None when no method has one.
    ``windows`` (setting -> ``train.final_window``) shades the evaluated rounds that the
    windowed final value averages.
    """
    stats = curve_stats(rounds, metric, statuses)
    if stats.empty:
        return None
    settings = sorted(stats["setting"].unique())
    fig, axes = _grid(len(settings), 5.5, 3.8)
    colours = _colours(_method_sort(stats["method"].unique()))
    for ax, setting in zip(axes, settings, strict=True):
        here = stats[stats["setting"] == setting]
        for method in _method_sort(here["method"].unique()):
            line = here[here["method"] == method].sort_values("round")
            seeds = int(line["seeds"].max())
            colour = colours[method]
            ax.plot(line["round"], line["mean"], color=colour, lw=1.6, ls=_style(method),
                    label=f"{method} (n={seeds})")
            band = line["std"].fillna(0.0)
            ax.fill_between(line["round"], line["mean"] - band, line["mean"] + band,
                            color=colour, alpha=0.15, lw=0)
        window = (windows or {}).get(setting)
        if window:
            last = np.sort(here["round"].unique())[-window:]
            ax.axvspan(last[0] - 0.5, last[-1] + 0.5, color="grey", alpha=0.12, lw=0,
                       label=f"final window ({window} rounds)")
        ax.set_title(_wrap(setting), fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


# ----- gain heat map ---------------------------------------------------------------------------
def gain_heatmap_figure(final: Table) -> Figure | None:
    """Sparsity x period heat maps of the LIPS hand-outs' gain over their baseline.

    One axis per setting and algorithm the hand-out is on top of (``fedavg``,
    ``fedprox(mu=0.01)``, ...). Cells are annotated with the gain; ``*`` marks a gain (or loss)
    the paired test supports.
    """
    data = final.data
    panels = [(setting, base) for setting in sorted(data["setting"].unique())
              for base in lips_bases(final, setting)
              if gain_grid(final, setting, base).notna().to_numpy().any()]
    if not panels:
        return None
    grids = {key: gain_grid(final, *key) for key in panels}
    limit = max(float(np.nanmax(np.abs(g.to_numpy()))) for g in grids.values()) or 1e-6
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    fig, axes = _grid(len(panels), 4.2, 3.4)
    for ax, (setting, base) in zip(axes, panels, strict=True):
        grid = grids[(setting, base)]
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu", norm=norm, aspect="auto")
        here = data[(data["setting"] == setting) & (data["handout"] == "lips")
                    & (data["base_method"] == base)]
        supported = {(s, p) for s, p, v in zip(here["sparsity"], here["period"], here["verdict"],
                                               strict=True) if v in ("gain", "loss")}
        partners = sorted({b for b in here["baseline"] if isinstance(b, str)})
        for i, sparsity in enumerate(grid.index):
            for j, period in enumerate(grid.columns):
                value = grid.iloc[i, j]
                if not np.isfinite(value):
                    ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="grey")
                    continue
                mark = "*" if (sparsity, period) in supported else ""
                colour = "white" if abs(value) > 0.6 * limit else "black"
                ax.text(j, i, f"{value:+.3f}{mark}", ha="center", va="center", fontsize=8,
                        color=colour)
        ax.set_xticks(range(len(grid.columns)), [f"{p:g}" for p in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{s:g}" for s in grid.index])
        ax.set_xlabel("period T")
        ax.set_ylabel("sparsity")
        against = ", ".join(partners) or "?"
        ax.set_title(_wrap(f"gain of {base}+lips over {against}: {setting}"), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="method - baseline")
    return fig


# ----- layer-wise inertia ----------------------------------------------------------------------
def inertia_matrix(layers: pd.DataFrame, value: str = "rel_update") -> pd.DataFrame:
    """Layer (model order) x round matrix of ``value``, averaged over the runs given."""
    table = layers.pivot_table(index=["layer_index", "layer", "kind", "eligible"],
                               columns="round", values=value, aggfunc="mean")
    return table.sort_index(level="layer_index")


def _layer_label(layer: str, kind: str, eligible: bool) -> str:
    return f"{'* ' if eligible else ''}{layer} ({kind})"


INERTIA_COLUMNS = 4  # heat maps per row of an inertia figure


def _is_fedavg_panel(name: str) -> bool:
    return name == "fedavg" or name.startswith("fedavg (")


def sparse_rounds(rounds: pd.DataFrame) -> list[int]:
    """The rounds whose hand-out was sparse (``density`` < 1) in the given rows of a LIPS
    run's ``rounds.parquet`` (of several runs: in any of them), in order."""
    if rounds.empty or "density" not in rounds:
        return []
    return sorted({int(r) for r in rounds.loc[rounds["density"] < 1.0, "round"]})


def freeze_rounds(rounds: pd.DataFrame) -> list[int]:
    """The rounds after which a ``handout: freeze`` run's trigger fired (``freeze_fired``) in
    the given rows of its ``rounds.parquet`` (of several runs: in any of them), in order."""
    if rounds.empty or "freeze_fired" not in rounds:
        return []
    fired = rounds["freeze_fired"].eq(True)  # NaN in the rows of other runs
    return sorted({int(r) for r in rounds.loc[fired, "round"]})


def _marks(rounds: pd.DataFrame, handout: str) -> tuple[list[int], str] | None:
    """The rounds a panel marks, and their label: a LIPS run's sparse hand-outs, a freeze
    run's firings; None for other hand-outs."""
    if handout == "lips":
        return sparse_rounds(rounds), SPARSE_LABEL
    if handout == "freeze":
        return freeze_rounds(rounds), FREEZE_LABEL
    return None


def inertia_panels_figure(panels: Sequence[tuple[str, pd.DataFrame]],
                          title: str = "",
                          sparse: Mapping[str, Sequence[int]] | None = None,
                          mark_labels: Mapping[str, str] | None = None) -> Figure:
    """Heat maps of ``rel_update`` (layer x round, shared log colour scale), side by side.

    ``panels`` are (title, layers rows) pairs, e.g. FedAvg and LIPS; more than
    :data:`INERTIA_COLUMNS` wrap onto further rows. Eligible (sparsified) layers are starred and
    coloured on the y axis (labelled on the first panel of a row, and on any panel whose layers
    differ from the first panel's). Below, the mean ``rel_update`` of the eligible layers per
    round, one line per panel (FedAvg black, LIPS hand-outs dashed). ``sparse`` (panel title ->
    rounds) marks the rounds whose hand-out was sparse: a red triangle above the panel's heat
    map and a dot on its line below, both labelled :data:`SPARSE_LABEL` (or the panel's
    ``mark_labels`` entry, e.g. :data:`FREEZE_LABEL` for a freeze run's firings).
    """
    sparse = sparse or {}
    mark_labels = mark_labels or {}
    matrices = [(name, inertia_matrix(rows) if not rows.empty else None) for name, rows in panels]
    values = np.concatenate([m.to_numpy(dtype=float).ravel() for _, m in matrices
                             if m is not None] or [np.array([])])
    positive = values[np.isfinite(values) & (values > 0)]
    vmin, vmax = (positive.min(), positive.max()) if positive.size else (1e-4, 1.0)
    norm = LogNorm(vmin=vmin, vmax=max(vmax, vmin * 1.0001))
    n_layers = max((len(m) for _, m in matrices if m is not None), default=1)
    k = max(1, len(matrices))
    ncols = min(k, INERTIA_COLUMNS)
    nrows = math.ceil(k / ncols)
    heat_height = max(2.5, 0.28 * n_layers)
    fig = Figure(figsize=(4.6 * ncols + 1.0, (heat_height + 0.9) * nrows + 2.4),
                 layout="constrained")
    spec = fig.add_gridspec(nrows + 1, ncols + 1, width_ratios=[1.0] * ncols + [0.05],
                            height_ratios=[heat_height] * nrows + [1.6])
    reference = next((m.index for _, m in matrices if m is not None), None)
    image = None
    for i, (name, matrix) in enumerate(matrices):
        ax = fig.add_subplot(spec[i // ncols, i % ncols])
        ax.set_title(_wrap(name, 40), fontsize=9)
        ax.set_xlabel("round")
        if matrix is None:
            ax.text(0.5, 0.5, "no layer metrics", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        rounds = matrix.columns.to_numpy()
        data = np.ma.masked_invalid(np.where(matrix.to_numpy(dtype=float) > 0,
                                             matrix.to_numpy(dtype=float), np.nan))
        image = ax.imshow(data, norm=norm, cmap="viridis", aspect="auto", interpolation="nearest",
                          extent=(rounds.min() - 0.5, rounds.max() + 0.5, len(matrix) - 0.5, -0.5))
        if i % ncols == 0 or not matrix.index.equals(reference):
            labels = [_layer_label(layer, kind, bool(el))
                      for _, layer, kind, el in matrix.index]
            ax.set_yticks(range(len(matrix)), labels, fontsize=7)
            for tick, (_, _, _, el) in zip(ax.get_yticklabels(), matrix.index, strict=True):
                if el:
                    tick.set_color(ELIGIBLE_COLOUR)
            if i % ncols == 0:
                ax.set_ylabel("layer (model order; * = LIPS-eligible)")
        else:
            ax.set_yticks(range(len(matrix)))
            ax.tick_params(labelleft=False)
        shown = set(rounds.tolist())
        marked = [r for r in sparse.get(name, ()) if r in shown]
        if marked:
            ax.plot(marked, [-0.5] * len(marked), ls="none", marker="v", ms=5,
                    color=SPARSE_COLOUR, clip_on=False,
                    label=mark_labels.get(name, SPARSE_LABEL))
    if image is not None:
        fig.colorbar(image, cax=fig.add_subplot(spec[:nrows, ncols]),
                     label="relative update ||Δw|| / ||w|| (log)")
    line_ax = fig.add_subplot(spec[nrows, :ncols])
    others = [name for name, m in matrices if m is not None and not _is_fedavg_panel(name)]
    colours = dict(zip(others, _cycle(len(others)), strict=False))
    for name, matrix in matrices:
        if matrix is None:
            continue
        eligible = matrix[matrix.index.get_level_values("eligible").astype(bool)]
        rows = eligible if len(eligible) else matrix
        colour = FEDAVG_COLOUR if _is_fedavg_panel(name) else colours[name]
        mean = rows.mean(axis=0)
        line_ax.plot(matrix.columns, mean, lw=1.4, label=name, color=colour,
                     ls=_style(name.split(" (")[0]))
        marked = [r for r in sparse.get(name, ()) if r in mean.index]
        if marked:
            line_ax.plot(marked, mean.loc[marked].to_numpy(), ls="none", marker="o", ms=4,
                         color=colour, markeredgecolor=SPARSE_COLOUR,
                         label=f"{name}: {mark_labels.get(name, SPARSE_LABEL)}")
    line_ax.set_yscale("log")
    line_ax.set_xlabel("round")
    line_ax.set_ylabel("mean rel. update,\neligible layers", fontsize=8)
    line_ax.grid(alpha=0.3)
    line_ax.legend(fontsize=7)
    if title:
        fig.suptitle(_wrap(title, 100), fontsize=10)
    return fig


def inertia_figure(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """The inertia figure of the given runs (e.g. FedAvg and LIPS of one comparison), as PNG."""
    frames = load(list(run_dirs), tables=("layers", "rounds"))
    panels, sparse, labels = [], {}, {}
    for run_dir in run_dirs:  # in the order given; a folder of runs contributes each of them
        root = Path(run_dir).expanduser().resolve()
        below = [Path(p) == root or root in Path(p).parents for p in frames.runs["path"]]
        for _, run in frames.runs[below].iterrows():
            rows = frames.layers[frames.layers["run_id"] == run["run_id"]]
            name = f"{run['method']} (seed {run.get('seed')})"
            panels.append((name, rows))
            marks = _marks(frames.rounds[frames.rounds["run_id"] == run["run_id"]],
                           str(run.get("handout")))
            if marks is not None:
                sparse[name], labels[name] = marks
    settings = sorted(frames.runs["setting"].unique())
    title = f"Layer-wise inertia: {'; '.join(settings)}"
    return save(inertia_panels_figure(panels, title, sparse, labels), out)


def setting_inertia_figure(layers: pd.DataFrame, setting: str,
                           methods: Sequence[str] | None = None,
                           statuses: Sequence[str] = ("finished",),
                           rounds: pd.DataFrame | None = None) -> Figure | None:
    """The methods of one setting side by side (all of them unless ``methods`` picks some),
    ``rel_update`` averaged over seeds; methods without layer metrics have no panel. Given
    the ``rounds`` frame, a LIPS method's panel marks the rounds whose hand-out was sparse in
    any of its seeds (the same rounds in every seed for a periodic schedule)."""
    rows = layers[(layers["setting"] == setting) & layers["status"].isin(statuses)]
    if rows.empty:
        return None
    methods = _method_sort(methods if methods is not None else rows["method"].unique())
    panels, sparse, labels = [], {}, {}
    for method in methods:
        here = rows[rows["method"] == method]
        if here.empty or here["rel_update"].isna().all():
            continue
        seeds = here["seed"].nunique()
        name = f"{method} (mean of {seeds} seed{'s' if seeds != 1 else ''})"
        panels.append((name, here))
        if rounds is not None and not rounds.empty:
            own = rounds[(rounds["setting"] == setting) & (rounds["method"] == method)
                         & rounds["status"].isin(statuses)]
            handouts = set(own["handout"]) if not own.empty and "handout" in own else set()
            marks = _marks(own, handouts.pop()) if len(handouts) == 1 else None
            if marks is not None:
                sparse[name], labels[name] = marks
    if not panels:
        return None
    return inertia_panels_figure(panels, f"Layer-wise inertia: {setting}", sparse, labels)

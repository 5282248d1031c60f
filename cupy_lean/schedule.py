"""The work decompositions of decode attention, computed in NumPy.

Vocabulary (see DESIGN.md):

unit
    One (batch ``b``, KV head ``h``) pair; unit index ``u = b * heads_kv + h``.
    All query heads sharing KV head ``h`` are processed together.
tile
    ``tile_size`` consecutive KV tokens of one unit; the last tile of a unit may
    be short. ``tiles(b) = ceil(kv_len[b] / tile_size)``.
segment
    The part of one CTA's tile range that lies inside one unit.
partial segment
    A segment that does not cover its whole unit: it writes a state to a
    workspace slot and the unit is reduced afterwards.

Three schedules share this vocabulary:

``"lean"``
    Stream-K: all tiles of all units are laid end to end (units in ``(b, h)``
    order, tiles in context order) and cut into ``num_ctas`` ranges whose sizes
    differ by at most one tile. A CTA's range may cross unit boundaries; only its
    first and last segments can be partial. The last CTA to finish a partial unit
    merges the unit's partial states in CTA order.
``"split"``
    FlashDecoding: every unit is cut into ``num_splits`` chunks of equal tile
    count, one CTA per (unit, chunk), followed by a combine step.
``"head"``
    FlashAttention-2: one CTA per unit.

The CUDA kernels derive the same quantities on the device; the tests hold the
two equal, and :func:`cupy_lean.reference.emulate` runs a schedule's
decomposition in float64.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import textwrap

import numpy as np

__all__ = [
    "Schedule",
    "combine_row_blocks",
    "merge_batches",
    "lean_schedule",
    "split_schedule",
    "head_schedule",
    "merge_balanced_tiles",
    "merge_group_size",
    "merges_by_launch",
    "num_splits_heuristic",
    "runtime_split_chunks",
    "runtime_split_slack",
    "tiles_per_sequence",
    "uniform_variant",
]

#: Names of the comparison schedules understood by :func:`cupy_lean.attention`.
SCHEDULES = ("lean", "split", "head")


def _as_lens(kv_lens, name="kv_lens"):
    from ._arrays import host_ints

    arr = host_ints(kv_lens, name)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of lengths, got shape {arr.shape}")
    # (Python integers stay objects in NumPy when one is past int64: range-checked as given, not wrapped)
    ints = np.issubdtype(arr.dtype, np.integer) or (arr.dtype == object and all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in arr))
    if arr.size and not ints:
        raise TypeError(f"{name}: expected an integer dtype, got {arr.dtype}")
    bad = (arr < 0) | (arr > np.iinfo(np.int64).max)  # before the cast, which would wrap
    if bad.any():
        i = int(np.argmax(bad))
        bound = ">= 0" if arr[i] < 0 else "below 2**63"
        raise ValueError(f"{name}: expected lengths {bound}, got {name}[{i}] = {int(arr[i])}")
    return arr.astype(np.int64, copy=False)


def _check_positive_int(value, name, low=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer >= {low}, got {value!r}")
    if int(value) < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {int(value)}")
    return int(value)


def tiles_per_sequence(kv_lens, tile_size):
    """Number of tiles of each sequence: ``ceil(kv_len / tile_size)``."""
    lens = _as_lens(kv_lens)
    tile_size = _check_positive_int(tile_size, "tile_size")
    return (lens + tile_size - 1) // tile_size


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A decomposition of the decode-attention work into CTAs.

    Every array is NumPy. Per-unit arrays have ``batch * heads_kv`` entries,
    per-CTA arrays ``num_ctas``; ``segments`` is a structured array with one row
    per segment, ordered by CTA, then by position within the CTA.

    Attributes
    ----------
    kind : str
        ``"lean"``, ``"split"`` or ``"head"``.
    kv_lens : ndarray of int64, shape (batch,)
    heads_kv, tile_size : int
    num_ctas : int
        Lean: CTAs that own work, ``min(total_tiles, grid)`` (extra CTAs of a
        larger grid exit at once). Split/head: the grid, ``units *
        num_splits``, including CTAs whose chunk is empty.
    tiles_per_seq : ndarray of int64, shape (batch,)
        ``ceil(kv_len / tile_size)``.
    unit_tiles : ndarray, shape (units,)
        Tiles of each unit (``tiles_per_seq`` repeated over heads).
    unit_start : ndarray, shape (units,)
        Index of each unit's first tile in the linear order (lean only; for the
        other schedules the same prefix sum, for reference).
    total_tiles : int
    max_tiles, heavy_ctas : int
        Stream-K split (lean): CTA ``c < heavy_ctas`` owns ``max_tiles`` tiles,
        the others ``max_tiles - 1``. For ``split``/``head``: tiles per chunk
        of the longest unit, and 0.
    num_splits : int
        Chunks per unit (split), 1 (head), 0 (lean).
    cta_start, cta_end : ndarray, shape (num_ctas,)
        Lean: each CTA's half-open range of linear tile indices. Split/head:
        the range of tiles within its unit.
    segments : structured ndarray
        Fields ``cta``, ``unit``, ``batch``, ``head``, ``tile_begin``,
        ``tile_end`` (tile indices within the unit, half open), ``partial``
        (the segment writes a workspace state instead of the output: for lean,
        the segment does not cover its unit; for split, every chunk when
        ``num_splits > 1``) and ``slot`` (workspace slot of a partial segment,
        -1 otherwise).
    contributors : ndarray, shape (units,)
        Number of partial states that make up each unit (0 when one CTA covers
        the unit whole, or the unit is empty).
    merge_launch : bool
        Lean: each partial unit's states are merged at once, in CTA order, by
        a second (combine) launch, instead of by the unit's last contributor
        in the kernel, which merges a unit of many pieces in groups first
        (:func:`merge_group_size`). Split with ``launch_split``: the same
        for the chunks of the launch-time split.
    launch_split : bool
        Kind ``"split"``: the split-K in one wave that a lean launch chose
        for its lengths (``lean_schedule(runtime_split=True)``): a chunk
        covering its unit whole is not partial, partial chunks use slot ``2
        x cta``, and a unit's chunks are merged as stream-K's pieces are
        (``merge_launch``). False for :func:`split_schedule`'s split-K.
    """

    kind: str
    kv_lens: np.ndarray
    heads_kv: int
    tile_size: int
    num_ctas: int
    tiles_per_seq: np.ndarray
    unit_tiles: np.ndarray
    unit_start: np.ndarray
    total_tiles: int
    max_tiles: int
    heavy_ctas: int
    num_splits: int
    cta_start: np.ndarray
    cta_end: np.ndarray
    segments: np.ndarray
    contributors: np.ndarray
    merge_launch: bool = False
    launch_split: bool = False

    @property
    def batch(self) -> int:
        """Sequences in the batch (empty ones included)."""
        return int(self.kv_lens.shape[0])

    @property
    def num_units(self) -> int:
        """Units (one sequence's one KV head each): batch x heads_kv."""
        return int(self.unit_tiles.shape[0])

    def tiles_per_cta(self) -> np.ndarray:
        """Number of tiles each CTA processes."""
        seg = self.segments
        out = np.zeros(self.num_ctas, dtype=np.int64)
        np.add.at(out, seg["cta"], seg["tile_end"] - seg["tile_begin"])
        return out

    def partial_units(self) -> np.ndarray:
        """Indices of the units that need a reduction of partial states."""
        return np.nonzero(self.contributors > 0)[0]

    def describe(self, grid_note=None) -> str:
        """A text dump of every schedule quantity, for logs and experiments;
        ``grid_note`` says where the CTA count came from."""
        seg = self.segments
        per_cta = self.tiles_per_cta()
        lines = [
            f"schedule          {self.kind}",
            f"batch             {self.batch}",
            f"heads_kv          {self.heads_kv}",
            f"units             {self.num_units}  (empty: {int((self.unit_tiles == 0).sum())})",
            f"tile_size         {self.tile_size}",
            f"total_tiles       {self.total_tiles}",
            f"num_ctas          {self.num_ctas}" + (f"  ({grid_note})" if grid_note else ""),
        ]
        if self.kind == "lean":
            lines += [
                f"max_tiles         {self.max_tiles}",
                f"heavy_ctas        {self.heavy_ctas}",
                "merge             " + ("by the combine launch (few units for the grid)" if self.merge_launch
                                        else "by each partial unit's last contributor, in the kernel"),
            ]
        else:
            lines += [f"num_splits        {self.num_splits}"
                      + ("  (split-K in one wave chosen at launch by a lean plan; chunks merged by "
                         + ("the combine launch)" if self.merge_launch else "each unit's last chunk, in the kernel)")
                         if self.launch_split else "")]
        if self.num_ctas:
            lines += [
                f"tiles per CTA     min {int(per_cta.min())}  max {int(per_cta.max())}"
                f"  mean {per_cta.mean():.2f}",
            ]
        lines += [
            f"segments          {len(seg)}  (partial: {int(seg['partial'].sum())})",
            f"partial units     {len(self.partial_units())}"
            + (
                f"  (contributors max {int(self.contributors.max())})"
                if self.contributors.size and self.contributors.max() > 0
                else ""
            ),
        ]
        if self.kind == "lean" and self.num_ctas and self.total_tiles:
            # The last wave is full by construction: the busiest CTA has at most
            # one tile more than the average.
            eff = self.total_tiles / (self.num_ctas * self.max_tiles)
            lines.append(f"balance           {eff:.3f}  (mean / max tiles per CTA)")
        return "\n".join(lines)

    def plot(self, path, *, title=None, grid_note=None):
        """Draw the schedule to a PNG file: every unit and every CTA.

        Bottom: one row per unit (grouped by sequence, coloured by sequence),
        a bar from the first to the last CTA that works on it; a solid bar is a
        unit one CTA covers whole (it writes the output), a hatched bar a unit
        split over several CTAs (each writes a partial state, the last to
        finish merges them). Empty sequences are listed on the left without a
        bar. Top: tiles per CTA (the balance). ``grid_note`` says where the
        CTA count came from (e.g. the SM count assumed). The file is a PNG at
        exactly ``path``, whatever its extension (none is added); returns
        ``path``. Needs matplotlib (``pip install -e '.[plot]'``).
        """
        check_png_path(path)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.patches import Patch, Rectangle
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("Schedule.plot needs matplotlib: pip install -e '.[plot]'") from exc
        seg = self.segments
        n_ctas = max(self.num_ctas, 1)
        units = self.num_units
        first = np.full(units, -1, dtype=np.int64)
        last = np.full(units, -1, dtype=np.int64)
        for s in seg:
            u, c = int(s["unit"]), int(s["cta"])
            first[u] = c if first[u] < 0 else min(first[u], c)
            last[u] = max(last[u], c)
        row_h = 0.09 if units <= 64 else max(0.02, 6.0 / units)
        fig_h = min(12.0, 2.2 + row_h * units + 0.25 * self.batch)
        fig, (ax_load, ax) = plt.subplots(2, 1, figsize=(10, fig_h), sharex=True,
                                          gridspec_kw={"height_ratios": [1, 4]})
        cmap = plt.get_cmap("tab10")
        per_cta = self.tiles_per_cta() if self.num_ctas else np.zeros(1)
        ax_load.bar(np.arange(len(per_cta)), per_cta, width=1.0, color="0.45")
        ax_load.set_ylabel("tiles\nper CTA", fontsize=8)
        ax_load.tick_params(labelsize=7)
        yticks, ylabels, empty = [], [], []
        y = 0
        for b in range(self.batch):
            rows = range(b * self.heads_kv, (b + 1) * self.heads_kv)
            n_tok = int(self.kv_lens[b])
            if self.tiles_per_seq[b] == 0:
                empty.append(b)
                yticks.append(y)
                ylabels.append(f"seq {b}: 0 tokens, no work")
                y += 1
                continue
            top = y
            for u in rows:
                partial = bool(self.contributors[u] > 0)
                ax.add_patch(Rectangle((first[u] - 0.5, y - 0.45), last[u] - first[u] + 1, 0.9,
                                       facecolor=cmap(b % 10), edgecolor="black" if partial else "none",
                                       linewidth=0.3, hatch="////" if partial else None))
                y += 1
            yticks.append((top + y - 1) / 2)
            ylabels.append(f"seq {b}: {n_tok} tokens")
            y += 0.5
        ax.set_yticks(yticks)
        ax.set_yticklabels(ylabels, fontsize=7 if self.batch <= 24 else 5)
        ax.set_ylim(max(y, 1) - 0.5, -0.7)
        ax.set_xlim(-0.5, n_ctas - 0.5)
        ax.set_xlabel("CTA", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(handles=[Patch(facecolor="0.8", label="unit covered by one CTA: writes its output"),
                           Patch(facecolor="0.8", hatch="////", edgecolor="black",
                                 label="unit split over CTAs: partial states, merged by "
                                       + ("the combine launch" if self.merge_launch else "the last"))],
                  fontsize=7, loc="lower left", framealpha=0.9)
        head = title or (
            f"{self.kind} schedule: {self.batch} sequences x {self.heads_kv} KV heads = {units} units (rows), "
            f"{self.total_tiles} tiles of {self.tile_size} tokens over {self.num_ctas} CTAs"
            + (f"; {grid_note}" if grid_note else ""))
        fig.suptitle("\n".join(textwrap.wrap(head, 120)), fontsize=9)  # the figure is 10 inches wide
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")  # format given: matplotlib adds no extension
        plt.close(fig)
        return path


def check_png_path(path):
    """A file name a PNG can be written to (:meth:`Schedule.plot`, the
    command line's ``--png``): not a folder, in a folder that exists."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file name (str or path), got {type(path).__name__} {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"path: expected a file name for the PNG, got {os.fspath(path)!r}, which is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: the folder {folder} of {os.fspath(path)!r} does not exist")
    return path


_SEG_DTYPE = np.dtype(
    [
        ("cta", np.int64),
        ("unit", np.int64),
        ("batch", np.int64),
        ("head", np.int64),
        ("tile_begin", np.int64),
        ("tile_end", np.int64),
        ("partial", np.bool_),
        ("slot", np.int64),
    ]
)


def _units(kv_lens, heads_kv, tile_size):
    lens = _as_lens(kv_lens)
    heads_kv = _check_positive_int(heads_kv, "heads_kv")
    tile_size = _check_positive_int(tile_size, "tile_size")
    tps = (lens + tile_size - 1) // tile_size
    unit_tiles = np.repeat(tps, heads_kv)
    unit_start = np.zeros(unit_tiles.shape[0], dtype=np.int64)
    if unit_tiles.size:
        np.cumsum(unit_tiles[:-1], out=unit_start[1:])
    return lens, heads_kv, tile_size, tps, unit_tiles, unit_start


def lean_cta_range(total_tiles, num_ctas, cta):
    """Half-open tile range ``[start, end)`` of CTA ``cta`` under stream-K.

    Works on scalars or NumPy arrays of CTA indices.
    """
    max_tiles = -(-total_tiles // num_ctas)
    heavy = total_tiles - (max_tiles - 1) * num_ctas
    cta = np.asarray(cta, dtype=np.int64)
    start = np.where(cta < heavy, cta * max_tiles,
                     heavy * max_tiles + (cta - heavy) * (max_tiles - 1))
    length = np.where(cta < heavy, max_tiles, max_tiles - 1)
    return start, start + length


def lean_cta_of_tile(total_tiles, num_ctas, tile):
    """The CTA that owns linear tile ``tile`` under stream-K."""
    max_tiles = -(-total_tiles // num_ctas)
    heavy = total_tiles - (max_tiles - 1) * num_ctas
    tile = np.asarray(tile, dtype=np.int64)
    light = np.maximum(max_tiles - 1, 1)
    return np.where(tile < heavy * max_tiles, tile // max_tiles,
                    heavy + (tile - heavy * max_tiles) // light)


#: Contributors of a unit from which the kernel merges its states in two
#: levels (:func:`merge_group_size`).
MERGE_TREE_FROM = 16


def merge_group_size(contributors, state_rows, scratch_floats):
    """Group size of the kernel's two-level merge of a stream-K unit cut into
    ``contributors`` pieces, or 0 for one merge of all of them.

    From :data:`MERGE_TREE_FROM` pieces on, contributors ``[q G, q G + G)``
    form group ``q``: the group's last arrival merges its states (in CTA
    order) into the slot of its first member, and the last group to finish
    merges the ``ceil(contributors / G)`` group states (in group order), so
    no CTA merges more than about ``2 sqrt(contributors)`` states while the
    others wait. ``G = ceil(sqrt(contributors))``, at most ``(scratch_floats
    // state_rows - 2) // 2`` with ``scratch_floats = tile_size x
    head_dim`` (a bound from the kernel's earlier merge, which gathered a
    group's maxima and sums in that much shared memory; kept so that the
    schedules stay the same); 0 when that leaves fewer than 2. The grouping
    depends on the count only, so the result is deterministic. The kernel
    computes the same integer.
    """
    n = _check_positive_int(contributors, "contributors", 0)
    rows = _check_positive_int(state_rows, "state_rows")
    red = _check_positive_int(scratch_floats, "scratch_floats")
    if n < MERGE_TREE_FROM:
        return 0
    g = min(math.isqrt(n - 1) + 1, (red // rows - 2) // 2)  # ceil(sqrt(n)), capped
    return g if g >= 2 else 0


def merge_balanced_tiles(longest_unit_tiles, merge_balance, state_rows, tile_size):
    """The fewest tiles ``n`` per stream-K CTA with ``n * n * tile_size >=
    merge_balance * longest_unit_tiles * state_rows`` (1 at least).

    A unit cut into ``P`` pieces is merged by one CTA that reads ``P``
    partial states of ``state_rows`` rows while the other CTAs stream; ranges
    of ``n`` tiles bound ``P`` to about ``longest / n``, which keeps that
    merge within ``merge_balance`` times the stream of one range. The kernel
    computes the same integer."""
    v = int(merge_balance) * int(longest_unit_tiles) * int(state_rows)
    n = max(1, math.isqrt(-(-v // int(tile_size))))
    while n * n * tile_size < v:
        n += 1
    while n > 1 and (n - 1) * (n - 1) * tile_size >= v:
        n -= 1
    return n


def lean_schedule(kv_lens, heads_kv, *, tile_size, num_ctas, min_tiles_per_cta=1, merge_balance=0,
                  state_rows=16, merge_launch=False, runtime_split=False, split_slack_tiles=None, split_scale=None,
                  split_cap_tiles=None):
    """The stream-K (LeanAttention) schedule (with ``runtime_split``: the
    split-K in one wave that a launch chooses instead where its lengths
    favour it).

    Parameters
    ----------
    kv_lens : array_like of int, shape (batch,)
        KV length of each sequence (0 allowed).
    heads_kv : int
        Number of KV heads.
    tile_size : int
        Tokens per tile: any positive size (a model; the kernels take the
        sizes of ``kernels.TILE_SIZES``).
    num_ctas : int
        Grid size. CTAs beyond the number of tiles own no work: the effective
        count is ``min(total_tiles, num_ctas)``, and with ``min_tiles_per_cta
        = m > 1`` at most ``max(1, total_tiles // m)``.
    min_tiles_per_cta : int
        Fewer, longer ranges on small calls (fewer partial states to merge).
    merge_balance : int
        0, or ``a``: every range holds at least
        :func:`merge_balanced_tiles` ``(longest unit's tiles, a, state_rows,
        tile_size)`` tiles (as if ``min_tiles_per_cta`` were that much, when
        larger), so that no unit is cut into more pieces than one CTA merges
        in about the time of one range's stream. The default plan uses
        ``kernels.TUNING["merge_balance"]`` (0: no floor).
    state_rows : int
        Rows of a unit's partial state (16 per query tile of the kernel spec).
    merge_launch : bool
        Partial units merged by a combine launch (:attr:`Schedule.merge_launch`;
        the kernel's choice when the grid has many CTAs per unit,
        ``kernels.TUNING["merge_launch_pieces"]``). The decomposition is the same.
    runtime_split : bool
        The kernel's launch-time choice (``kernels.TUNING["runtime_split"]``,
        with ``merge_launch``; without it ``kernels.TUNING
        ["runtime_split_in_kernel"]``): where :func:`runtime_split_chunks`
        picks split-K in one wave for these lengths, the schedule the kernel
        then runs: kind ``"split"`` with ``launch_split``, ``ns = num_ctas //
        units`` chunks per unit on consecutive CTAs, a unit that one chunk
        covers whole written directly, the others' chunks in slots ``2 x
        cta``, merged by the combine launch (``merge_launch``) or else by the
        unit's last arriving chunk; else the stream-K schedule.
    split_slack_tiles, split_scale : int or None
        With ``runtime_split``: the rule's slack in tiles (0 to 2**30) and its
        factor on stream-K's busiest CTA (1 to 64) (a plan's
        :attr:`~cupy_lean.Plan.split_slack_tiles` and
        :attr:`~cupy_lean.Plan.split_scale`). None: what a default fp16
        plan at ``head_dim`` 128 with this ``tile_size`` and ``merge_launch``
        takes (``kernels.launch_split_rule``: 1 and one tile with the merge
        launch, ``kernels.TUNING["runtime_split_in_kernel_scale"]`` and no
        tile without it, at the default byte slack). Checked, and unused,
        without ``runtime_split``.
    split_cap_tiles : int or None
        With ``runtime_split``: the rule's cap in tiles above stream-K's
        busiest CTA (0 to 2**30, 2**30: none; a plan's
        :attr:`~cupy_lean.Plan.split_cap_tiles`). None: what a default fp16
        plan at ``head_dim`` 128 with this ``tile_size`` and ``merge_launch``
        takes (``kernels.launch_split_cap``). Checked, and unused, without
        ``runtime_split``.

    Returns
    -------
    Schedule
    """
    lens, heads_kv, tile_size, tps, unit_tiles, unit_start = _units(kv_lens, heads_kv, tile_size)
    num_ctas = _check_positive_int(num_ctas, "num_ctas")
    min_tiles = _check_positive_int(min_tiles_per_cta, "min_tiles_per_cta")
    if not isinstance(merge_balance, (int, np.integer)) or isinstance(merge_balance, bool):
        raise TypeError(f"merge_balance: expected an integer >= 0, got {type(merge_balance).__name__} "
                        f"{merge_balance!r}")
    if merge_balance < 0:
        raise ValueError(f"merge_balance: expected an integer >= 0, got {merge_balance!r}")
    state_rows = _check_positive_int(state_rows, "state_rows")
    if not isinstance(merge_launch, (bool, np.bool_)):
        raise TypeError(f"merge_launch: expected a bool, got {merge_launch!r}")
    if not isinstance(runtime_split, (bool, np.bool_)):
        raise TypeError(f"runtime_split: expected a bool, got {runtime_split!r}")
    if split_slack_tiles is None or split_scale is None or split_cap_tiles is None:
        from .kernels import launch_split_cap, launch_split_rule  # a default fp16 plan's rule at head_dim 128

        scale, slack = launch_split_rule(bool(merge_launch), tile_size, 128, 2)
        split_scale = scale if split_scale is None else split_scale
        split_slack_tiles = slack if split_slack_tiles is None else split_slack_tiles
        if split_cap_tiles is None:
            split_cap_tiles = launch_split_cap(bool(merge_launch), tile_size, 128, 2)
    split_slack_tiles, split_scale = _check_split_rule(split_slack_tiles, split_scale)
    split_cap_tiles = _check_split_cap(split_cap_tiles)
    total = int(unit_tiles.sum())
    if merge_balance and total:
        min_tiles = max(min_tiles, merge_balanced_tiles(int(unit_tiles.max()), merge_balance, state_rows,
                                                        tile_size))
    ncta = _stream_k_ctas(total, num_ctas, min_tiles)
    if ncta == 0:
        return Schedule("lean", lens, heads_kv, tile_size, 0, tps, unit_tiles, unit_start,
                        0, 0, 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64),
                        np.zeros(0, _SEG_DTYPE), np.zeros(unit_tiles.shape[0], np.int64), bool(merge_launch))
    max_tiles = -(-total // ncta)
    heavy = total - (max_tiles - 1) * ncta
    ns = _split_count(tps, unit_tiles, num_ctas, ncta, split_slack_tiles, split_scale,
                      split_cap_tiles) if runtime_split else 0
    if ns:
        return _runtime_split(lens, heads_kv, tile_size, tps, unit_tiles, unit_start, ns, merge_launch)
    ctas = np.arange(ncta, dtype=np.int64)
    cta_start, cta_end = lean_cta_range(total, ncta, ctas)
    unit_end = unit_start + unit_tiles

    rows = []
    for c in range(ncta):
        cs, ce = int(cta_start[c]), int(cta_end[c])
        # First unit whose range contains tile cs (skipping empty units).
        u = int(np.searchsorted(unit_end, cs, side="right"))
        first = True
        while cs < ce:
            us, ue = int(unit_start[u]), int(unit_end[u])
            if ue == us:
                u += 1
                continue
            s_end = min(ce, ue)
            partial = not (cs == us and s_end == ue)
            slot = (2 * c + (0 if first else 1)) if partial else -1
            b, h = divmod(u, heads_kv)
            rows.append((c, u, b, h, cs - us, s_end - us, partial, slot))
            first = False
            cs = s_end
            u += 1
    segments = np.array(rows, dtype=_SEG_DTYPE)
    contributors = np.zeros(unit_tiles.shape[0], dtype=np.int64)
    part = segments[segments["partial"]]
    np.add.at(contributors, part["unit"], 1)
    return Schedule("lean", lens, heads_kv, tile_size, ncta, tps, unit_tiles, unit_start,
                    total, max_tiles, heavy, 0, cta_start, cta_end, segments, contributors, bool(merge_launch))


def _chunk_segments(unit_tiles, heads_kv, ns, split_k):
    """``ns`` chunks of ``ceil(tiles / ns)`` tiles per unit, unit ``u``'s on
    CTAs ``u * ns ...``: ``(chunk, starts, ends, segments)``. ``split_k``:
    the split-K kernel's marking (every chunk partial when ``ns > 1``, slot
    ``cta``); else the stream-K kernel's (a chunk covering its unit whole
    written directly, slot ``2 x cta``)."""
    units = unit_tiles.shape[0]
    chunk = -(-unit_tiles // ns)
    rows = []
    starts = np.zeros(units * ns, dtype=np.int64)
    ends = np.zeros(units * ns, dtype=np.int64)
    for u in range(units):
        b, h = divmod(u, heads_kv)
        n = int(unit_tiles[u])
        for j in range(ns):
            c = u * ns + j
            t0 = min(j * int(chunk[u]), n)
            t1 = min(t0 + int(chunk[u]), n)
            starts[c], ends[c] = t0, t1
            if t1 > t0:
                partial = ns > 1 if split_k else not (t0 == 0 and t1 == n)
                rows.append((c, u, b, h, t0, t1, partial, (c if split_k else 2 * c) if partial else -1))
    return chunk, starts, ends, np.array(rows, dtype=_SEG_DTYPE)


def _runtime_split(lens, heads_kv, tile_size, tps, unit_tiles, unit_start, ns, merge_launch):
    """The split-K in one wave that a stream-K launch runs when its lengths
    favour it (see :func:`lean_schedule`)."""
    units = unit_tiles.shape[0]
    chunk, starts, ends, segments = _chunk_segments(unit_tiles, heads_kv, ns, split_k=False)
    contributors = np.zeros(units, dtype=np.int64)
    np.add.at(contributors, segments[segments["partial"]]["unit"], 1)
    return Schedule("split", lens, heads_kv, tile_size, units * ns, tps, unit_tiles, unit_start,
                    int(unit_tiles.sum()), int(chunk.max()), 0, ns, starts, ends, segments, contributors,
                    bool(merge_launch), True)


def merges_by_launch(num_ctas, num_units, pieces):
    """Whether a default lean plan merges stream-K's partial units by the
    combine launch (:attr:`Schedule.merge_launch`) rather than in the kernel:
    the grid has at least ``pieces`` CTAs per unit (``num_ctas >= pieces x
    num_units``; ``pieces`` is ``kernels.TUNING["merge_launch_pieces"]``, 0:
    never). Plans given a stream-K knob (``num_ctas``, ``ctas_per_sm``,
    ``min_tiles_per_cta``, a ``merge_balance`` other than 0) keep the
    in-kernel merge."""
    num_ctas = _check_positive_int(num_ctas, "num_ctas")
    num_units = _check_positive_int(num_units, "num_units", low=0)
    pieces = _check_positive_int(pieces, "pieces", low=0)
    return pieces > 0 and num_units > 0 and num_ctas >= pieces * num_units


def _stream_k_ctas(total, num_ctas, min_tiles):
    """Stream-K's CTAs with work: the grid, at most one CTA per ``min_tiles``
    tiles and per tile (the kernel's StreamK::make)."""
    return min(num_ctas, max(1, total // min_tiles) if min_tiles > 1 else total) if total else 0


def _check_rule_tiles(value, name):
    """A tile count of the launch-time split's rule (its slack or its cap):
    0 to 2**30, what the kernel's int parameter holds."""
    value = _check_positive_int(value, name, low=0)
    if value > 1 << 30:
        raise ValueError(f"{name}: expected an integer from 0 to 2**30, got {value}")
    return value


def _check_split_rule(split_slack_tiles, split_scale):
    """The launch-time split rule's slack (0 to 2**30 tiles) and factor (1 to
    64): what the kernel's int parameters hold."""
    split_slack_tiles = _check_rule_tiles(split_slack_tiles, "split_slack_tiles")
    split_scale = _check_positive_int(split_scale, "split_scale")
    if split_scale > 64:
        raise ValueError(f"split_scale: expected an integer from 1 to 64, got {split_scale}")
    return split_slack_tiles, split_scale


def _check_partial_grid(points):
    """:func:`uniform_variant`'s ``partial_grid``: at least one ``(fraction,
    relative time)`` pair, fractions increasing in (0, 1], times positive;
    returned as a tuple of float pairs."""
    try:
        pts = tuple((float(f), float(r)) for f, r in points)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"partial_grid: expected (fraction, relative time) pairs, got {points!r}") from None
    if not pts or any(not (0 < f <= 1 and math.isfinite(r) and r > 0) for f, r in pts) \
            or any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
        raise ValueError(f"partial_grid: expected (fraction, relative time) pairs with fractions increasing in "
                         f"(0, 1] and positive times, got {points!r}")
    return pts


def partial_grid_time(points, fraction):
    """The time of a wave whose CTAs fill ``fraction`` of the grid, each
    streaming its own unit, over stream-K's on the whole grid, from measured
    ``(fraction, relative time)`` points (``kernels.TUNING["partial_grid_time"]``,
    measured by ``tools/cta_rate.py``): linear between the points, made
    non-increasing in the fraction (a point is never cheaper than one with
    fewer CTAs: fewer CTAs do not stream faster, and a single dip's
    measurement is not trusted to be a valley); below the first point the
    CTAs' own rate sets the pace (time times ``first / fraction``), above
    the last the last point's time."""
    return _envelope_time(_envelope(_check_partial_grid(points)), fraction)


def _envelope(pts):
    """Checked points made non-increasing in the fraction (each time the
    largest at or above its fraction)."""
    env = []
    worst = 0.0
    for f, r in reversed(pts):
        worst = max(worst, r)
        env.append((f, worst))
    env.reverse()
    return env


def _envelope_time(env, fraction):
    """:func:`partial_grid_time` on an envelope already made."""
    f0, r0 = env[0]
    if fraction <= f0:
        return r0 * f0 / fraction
    for (fa, ra), (fb, rb) in zip(env, env[1:]):
        if fraction <= fb:
            return ra + (rb - ra) * (fraction - fa) / (fb - fa)
    return env[-1][1]


def _check_saturation(saturation):
    """:func:`uniform_variant`'s saturating fraction: a number in (0, 1]."""
    if isinstance(saturation, bool) or not isinstance(saturation, (int, float)) or not 0 < saturation <= 1:
        raise ValueError(f"saturation: expected a number in (0, 1], got {saturation!r}")
    return float(saturation)


def _check_split_cap(split_cap_tiles):
    """The launch-time split rule's cap (0 to 2**30 tiles; 2**30: none)."""
    return _check_rule_tiles(split_cap_tiles, "split_cap_tiles")


def _split_count(tps, unit_tiles, num_ctas, ncta, split_slack_tiles, split_scale=1, split_cap_tiles=1 << 30):
    """runtime_split_chunks' rule on checked inputs (``ncta``: stream-K's
    CTAs with work)."""
    units, total = int(unit_tiles.shape[0]), int(unit_tiles.sum())
    if units == 0 or total == 0:
        return 0
    ns = num_ctas // units
    return ns if ns >= 1 and _split_rule_allows(-(-int(tps.max()) // ns), -(-total // ncta), split_scale,
                                               split_slack_tiles, split_cap_tiles) else 0


def _split_rule_allows(chunk, per, split_scale, split_slack_tiles, split_cap_tiles=1 << 30):
    """The launch-time split rule's comparison (the kernel's find_work makes
    the same): the split's busiest CTA streams ``chunk`` tiles, stream-K's
    ``per``; the split is taken when ``chunk <= min(split_scale x per, per +
    split_cap_tiles) + split_slack_tiles``. Unchecked (tools evaluating the
    rule on measured rows call it too)."""
    return chunk <= min(split_scale * per, per + split_cap_tiles) + split_slack_tiles


def runtime_split_slack(tile_size, head_dim, kv_itemsize, slack_bytes, at_least=1):
    """Tiles of :func:`runtime_split_chunks`' ``split_slack_tiles`` for a kernel
    of ``tile_size`` tokens at ``head_dim`` with K and V elements of
    ``kv_itemsize`` bytes: ``slack_bytes`` of K and V per CTA
    (``kernels.TUNING["runtime_split_slack_bytes"]``) in whole tiles, at
    least ``at_least`` (0 or 1; the merge launch's rule takes 1, the
    in-kernel merge's 0, see ``kernels.launch_split_rule``) and at most
    2**30 (what the kernel's int parameter holds; more tiles than any batch
    has)."""
    tile_size = _check_positive_int(tile_size, "tile_size")
    head_dim = _check_positive_int(head_dim, "head_dim")
    kv_itemsize = _check_positive_int(kv_itemsize, "kv_itemsize")
    slack_bytes = _check_positive_int(slack_bytes, "slack_bytes", low=0)
    if type(at_least) is not int or at_least not in (0, 1):
        raise ValueError(f"at_least: expected 0 or 1, got {at_least!r}")
    return min(1 << 30, max(at_least, slack_bytes // (2 * tile_size * head_dim * kv_itemsize)))


def runtime_split_chunks(kv_lens, heads_kv, tile_size, num_ctas, min_tiles_per_cta=1, split_slack_tiles=1,
                         split_scale=1, split_cap_tiles=1 << 30):
    """Chunks per unit of the split-K a lean launch runs instead of stream-K
    (``kernels.TUNING["runtime_split"]``; with the merge launch, or without
    it by ``kernels.TUNING["runtime_split_in_kernel"]``), or 0 for
    stream-K: ``ns = num_ctas // units`` chunks when the busiest CTA of that
    split streams at most ``split_scale`` times stream-K's busiest, yet at
    most ``split_cap_tiles`` tiles above it, plus ``split_slack_tiles``
    tiles: ``ceil(longest unit's tiles / ns) <= min(split_scale x per, per
    + split_cap_tiles) + split_slack_tiles`` with ``per = ceil(total tiles
    / CTAs)`` (``kv_lens`` as the kernel walks them: window lengths with a window,
    0 for a sequence of no query tokens, see :func:`cupy_lean.reference.window_start`).
    The kernel takes the same decision at every launch from the lengths on
    the GPU. ``min_tiles_per_cta``: stream-K's floor on a CTA's range
    (raised by a merge balance), which the comparison uses as the kernel
    does. ``split_scale`` and ``split_slack_tiles`` price what stream-K's
    cuts cost a small call (partial stores, the wait for every piece, the
    merge) in tiles a CTA streams meanwhile; the plans take
    ``kernels.launch_split_rule``: 1 and one tile with the merge launch
    (these defaults), 2 and no tile with the in-kernel merge, where a cut
    unit's last piece merges on the streaming path, and with it
    ``kernels.launch_split_cap`` (a cut's cost does not grow with the
    range: the factor alone would take a split whose busiest CTA streams
    far more than stream-K's on a long call). ``split_slack_tiles`` and
    ``split_cap_tiles`` 0 to 2**30 (2**30: no cap), ``split_scale`` 1 to 64
    (the kernel's int parameters)."""
    lens, heads_kv, tile_size, tps, unit_tiles, _ = _units(kv_lens, heads_kv, tile_size)
    num_ctas = _check_positive_int(num_ctas, "num_ctas")
    m = _check_positive_int(min_tiles_per_cta, "min_tiles_per_cta")
    split_slack_tiles, split_scale = _check_split_rule(split_slack_tiles, split_scale)
    split_cap_tiles = _check_split_cap(split_cap_tiles)
    return _split_count(tps, unit_tiles, num_ctas, _stream_k_ctas(int(unit_tiles.sum()), num_ctas, m),
                        split_slack_tiles, split_scale, split_cap_tiles)


def num_splits_heuristic(num_units, max_unit_tiles, num_sms, max_splits=128):
    """FlashDecoding's choice of chunks per unit.

    With enough units to fill the GPU (at least 80% of the SMs), no split. Else
    every split count up to ``min(max_splits, num_sms, max_unit_tiles)`` gets a
    wave efficiency ``w / ceil(w)`` with ``w = num_units * splits / num_sms``;
    split counts that give the same chunk length as a smaller count are
    skipped, and the smallest count within 85% of the best efficiency wins.
    ``num_units`` or ``max_unit_tiles`` of 0 or below (nothing to split)
    gives 1; ``num_sms`` and ``max_splits`` must be positive.
    """
    for name, value in (("num_units", num_units), ("max_unit_tiles", max_unit_tiles)):  # <= 0: 1 split
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an integer, got {value!r}")
    num_sms = _check_positive_int(num_sms, "num_sms")
    max_splits = _check_positive_int(max_splits, "max_splits")
    if num_units <= 0 or max_unit_tiles <= 0:
        return 1
    if num_units >= 0.8 * num_sms:
        return 1
    limit = max(1, min(max_splits, num_sms, max_unit_tiles))

    def chunk(s):
        return -(-max_unit_tiles // s)

    effs = {}
    for s in range(1, limit + 1):
        if s > 1 and chunk(s) == chunk(s - 1):
            continue
        waves = num_units * s / num_sms
        effs[s] = waves / math.ceil(waves)
    best = max(effs.values())
    for s in sorted(effs):
        if effs[s] >= 0.85 * best:
            return s
    return 1  # pragma: no cover


def merge_batches(rows, num_states, head_dim, threads):
    """Load rounds one CTA of ``threads`` threads takes to merge
    ``num_states`` partial states of ``rows`` query rows of ``head_dim``
    (the kernel's one-pass merge: each thread keeps 16 float4 loads in flight
    at head_dim >= 128, 8 below; ``lanes`` threads share an element when
    there are few elements and many states; rows beyond one pass take
    another). Its time grows with this count: one L2 round trip each.
    ``head_dim`` a positive multiple of 32, ``threads`` of 32."""
    rows = _check_positive_int(rows, "rows")
    num_states = _check_positive_int(num_states, "num_states")
    head_dim = _check_positive_int(head_dim, "head_dim")
    threads = _check_positive_int(threads, "threads")
    if head_dim % 32 or threads % 32:
        raise ValueError(f"head_dim, threads: expected multiples of 32, got head_dim={head_dim}, threads={threads}")
    if 32 * threads < head_dim:
        raise ValueError(f"threads: a row of head_dim {head_dim} needs at least head_dim / 32 = {head_dim // 32} "
                         f"threads (8 float4 elements each), got {threads}")
    per_row = head_dim // 4
    e = rows * per_row
    lanes = 1
    while lanes < 32 and 2 * lanes * e <= threads and 16 * lanes <= num_states:
        lanes *= 2
    ept = -(-e * lanes // threads)
    ch = 8 if ept > 4 else 4 if ept > 2 else 2 if ept > 1 else 1
    loads = 16 if head_dim >= 128 else 8
    rows_per_pass = threads // lanes // (per_row // ch)
    return -(-rows // rows_per_pass) * -(-num_states // (loads // ch * lanes))


def combine_row_blocks(num_units, unit_rows, num_sms, num_states=2, head_dim=0, threads=0):
    """CTAs per unit of the split-K combine launch: the unit's query rows are
    split evenly over that many CTAs, each merging every chunk's state for
    its rows. One CTA per unit when it merges the ``num_states`` states in
    one load round (:func:`merge_batches`, given ``head_dim`` and the CTA's
    ``threads``; ``head_dim`` 0: never); otherwise as many as one wave of
    ``num_sms`` CTAs holds in all, no more CTAs than rows and none without
    rows, so that a few units of many chunks merge on many SMs at once
    instead of one each. Measured on an H200 (rows spread to one wave
    against one CTA per unit): 10 units of 12 chunks of 11 x 256 dims
    (6 rounds on one CTA) 49.7 -> 46.2 us, 6 units of 20 chunks of 15 x 64
    dims 16.5 -> 15.6 us, 2 units of 65 chunks of 12 x 128 dims 22.6 ->
    18.1 us; merges of one round took 0.4-0.7 us more spread (14.2 -> 14.6,
    35.6 -> 36.2 us), and 189 CTAs on 132 SMs (a second wave) 2.3 us more
    than 63."""
    num_units = _check_positive_int(num_units, "num_units")
    unit_rows = _check_positive_int(unit_rows, "unit_rows")
    num_sms = _check_positive_int(num_sms, "num_sms")
    num_states = _check_positive_int(num_states, "num_states")
    if head_dim > 0 and merge_batches(unit_rows, num_states, head_dim, threads) <= 1:
        return 1
    per = -(-unit_rows // min(unit_rows, max(1, num_sms // num_units)))  # rows per CTA
    return -(-unit_rows // per)


def uniform_variant(num_units, unit_tiles, grid, num_sms, tile_us=0.0, cut_us=2.0, slack=0.02,
                    saturation=0.8, state_bytes=0, combine_bytes=256 * 1024, unit_rows=1, head_dim=0, threads=0,
                    partial_grid=None, cta_bound=0.0):
    """The decomposition the ``"lean"`` plan runs when every sequence has the
    same length (dense calls without ``kv_lens``, or one sequence): 0 for
    stream-K over ``grid`` CTAs, else the number of chunks per unit of the split-K variant (1: one
    CTA per unit, no partial state at all).

    With equal units, stream-K cuts units inside CTAs wherever ``grid`` does
    not divide the tiles, and each cut costs a partial store, an arrival and
    a merge after the CTA's last tile, while split-K with chunks that fill
    the GPU evenly merges in a second short launch, or not at all. A
    streaming model decides: a wave of ``w`` CTAs of ``c`` tiles each takes
    ``c * max(w, saturation * grid) * tile_us`` microseconds (that many CTAs
    saturate HBM, fewer stream at their own rate; ``tile_us``: one unit's
    tile over the whole HBM bandwidth), waves of at most ``grid`` CTAs run
    one after the other. Candidates: one CTA per unit and the split count of
    :func:`num_splits_heuristic`, at most ``grid // num_units`` (its CTAs
    fit one wave: a second wave's CTAs start their prologue and pipeline
    ramp after the first's end, which the model does not price; measured on
    an H200, 32 dense shapes of 39-126 units and 300-2000 tokens, the
    one-wave count took 0.58-1.01 of the multi-wave split's time, 0.911 as
    a geometric mean over all 32); the faster one is taken when its model time
    is at most ``(1 + slack)`` times stream-K's (``units x tiles`` over
    ``min(grid, units x tiles)`` CTAs) plus ``cut_us``, what a cut unit's
    store, arrival and merge cost stream-K beyond a combine launch (measured
    per CTA: 3-10 us after the last tile on small calls), one CTA per unit on
    a tie. ``tile_us`` 0: the model compares streaming alone. A split count
    whose combine would have one CTA read more than ``combine_bytes`` of
    partial states (``state_bytes`` each; the combine spreads a unit's
    ``unit_rows`` rows over :func:`combine_row_blocks` CTAs, given
    ``head_dim`` and the CTA's ``threads``, and one reads the states of
    ``ceil(unit_rows / CTAs)`` rows) is not a candidate: measured on an H200
    with one combine CTA per unit, 59 chunks of 12 x 258 floats (0.73 MB)
    took 1.20x stream-K's time, 29-75 chunks of
    0.31-0.48 MB 1.02-1.03x, while every split under 0.2 MB per unit ran
    within 1.015x of stream-K or faster.

    ``partial_grid`` (a sequence of ``(fraction, relative time)`` points)
    replaces the saturation step with measured rates: a wave of ``w`` CTAs
    takes ``c * w * rel(f) * tile_us`` with ``f = min(1, w / num_sms)`` (the
    points were measured with one CTA per SM, so a grid of two CTAs per SM
    is full from ``num_sms`` CTAs on), where ``rel`` is the larger of
    :func:`partial_grid_time` of the points at ``f`` (the time of ``w`` CTAs
    each streaming its own unit, over stream-K's on every SM, made
    non-increasing in the fraction), ``cta_bound / f`` (with fewer than
    ``cta_bound x num_sms`` CTAs their own streaming rate, not DRAM, sets
    the pace) and 1; ``saturation`` is then unused.
    """
    saturation = _check_saturation(saturation)
    for name, value in (("num_units", num_units), ("unit_tiles", unit_tiles), ("grid", grid), ("num_sms", num_sms)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # (<= 0: no work, 0 below)
            raise TypeError(f"{name}: expected an integer, got {value!r}")
    for name, value, low in (("tile_us", tile_us, 0.0), ("cut_us", cut_us, 0.0), ("slack", slack, -1.0),
                             ("cta_bound", cta_bound, 0.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= low):
            raise ValueError(f"{name}: expected a finite number >= {low:g}, got {value!r}")
    if num_units <= 0 or unit_tiles <= 0 or grid <= 0:
        return 0
    sat = saturation * grid
    if partial_grid is not None:
        env = _envelope(_check_partial_grid(partial_grid))
        bound = float(cta_bound)  # (checked above)

        def wave(w):
            f = min(1.0, w / max(1, num_sms))
            return w * max(1.0, _envelope_time(env, f), bound / f)
    else:
        def wave(w):
            return max(w, sat)

    def model(ctas, chunk):
        t, n = 0.0, ctas
        while n > 0:
            w = min(n, grid)
            t += chunk * wave(w)
            n -= w
        return t * tile_us if tile_us > 0 else t

    total = num_units * unit_tiles
    g = min(grid, total)
    stream_k = model(g, total / g)
    best, best_t = 0, None
    for ns in (1, min(num_splits_heuristic(num_units, unit_tiles, num_sms), max(1, grid // num_units))):
        if ns > 1:
            blocks = combine_row_blocks(num_units, unit_rows, num_sms, ns, head_dim, threads)
            if ns * state_bytes * -(-unit_rows // blocks) > combine_bytes * unit_rows:  # one CTA's share
                continue
        t = model(num_units * ns, -(-unit_tiles // ns))
        if best_t is None or t < best_t:
            best, best_t = ns, t
    return best if best_t <= (1 + slack) * stream_k + (cut_us if tile_us > 0 else 0.0) else 0


def split_schedule(kv_lens, heads_kv, *, tile_size, num_splits):
    """The FlashDecoding schedule: ``num_splits`` chunks per unit.

    CTA ``c`` handles unit ``c // num_splits``, chunk ``c % num_splits``; a chunk
    has ``ceil(tiles(b) / num_splits)`` tiles (the last ones may be short or
    empty). With ``num_splits == 1`` every CTA writes its unit's output directly
    (the ``"head"`` schedule); otherwise every chunk writes a partial state to
    slot ``c`` and a combine step merges each unit's chunks in order.
    """
    lens, heads_kv, tile_size, tps, unit_tiles, unit_start = _units(kv_lens, heads_kv, tile_size)
    num_splits = _check_positive_int(num_splits, "num_splits")
    nunits = unit_tiles.shape[0]
    ncta = nunits * num_splits
    chunk, starts, ends, segments = _chunk_segments(unit_tiles, heads_kv, num_splits, split_k=True)
    contributors = np.zeros(nunits, dtype=np.int64)
    part = segments[segments["partial"]]
    np.add.at(contributors, part["unit"], 1)
    kind = "head" if num_splits == 1 else "split"
    max_chunk = int(chunk.max()) if chunk.size else 0
    return Schedule(kind, lens, heads_kv, tile_size, ncta, tps, unit_tiles, unit_start,
                    int(unit_tiles.sum()), max_chunk, 0, num_splits, starts, ends,
                    segments, contributors)


def head_schedule(kv_lens, heads_kv, *, tile_size):
    """The FlashAttention-2 schedule: one CTA per unit (a sequence's KV head),
    no partial states; ``split_schedule`` with one split.

    ``kv_lens``: the sequences' lengths (tokens, >= 0); ``heads_kv``: KV heads
    per sequence; ``tile_size``: tokens per tile. Returns a :class:`Schedule`
    of ``len(kv_lens) x heads_kv`` CTAs."""
    return split_schedule(kv_lens, heads_kv, tile_size=tile_size, num_splits=1)

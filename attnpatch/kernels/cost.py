"""A cost model of the kernels, so ``kernels.select`` runs the fastest exact kernel for a plan,
shape and device instead of a fixed order.

Every estimate is in seconds, from a few per-device constants measured by
``benchmarks/calibrate_cost.py`` (written to ``cost_<device>.json`` next to this file, per torch
thread count; the file names the machine and the date). With ``E = B H_q S_q S_kv`` score elements
and ``elem_s(D)`` / ``mask_elem_s(D)`` the seconds per element of dense SDPA and the extra of an
additive mask, measured per head dim (the CPU kernel's rate differs several-fold between head dims;
``per_d`` interpolates):

- ``sdpa``, plain (no mask_mod; causal from 0 runs as ``is_causal``)::

      call_s + E * elem_s(D) * (causal_factor if causal else 1)

- ``sdpa``, masked (a materialised mask: the kernel computes every score and reads the mask; on the CPU a
  static causal plan from 0 over more than one key block runs the flash kernel with is_causal and its cached
  mask, skipping the blocks above the diagonal)::

      call_s + E * (elem_s(D) + mask_elem_s(D)) * (causal_factor if that else 1)
      [+ build_s + B H' S_q S_kv * build_s_per_elem unless cached; H' = H_q for a data-dependent lines plan's
      per-head mask, else 1]

  A static plan's mask is cached after its first call (``Plan.static``; kernels/sdpa.py; masks
  larger than that cache are built per call); a static plan whose BlockSparse keeps every block
  entirely needs no mask at all (plain cost).
- ``tiles`` (block-sparse: one SDPA call per run of blocks, parts merged by their LSE)::

      call_s * calls + (density - diag * (1 - diag_factor)) * E * elem_s(D) * tiles_factor
      + partial * E * mask_elem_s(D)
      + lse_s * lse_parts + merge_s_per_elem * merged elements + gather_s_per_byte * gathered bytes

  The groups are the refined ones (kernels/tile_runs.py: causal diagonals, trimmed and split runs). A
  gathered group (``Group.gather``: a causal plan's runs copied side by side for one masked call)
  counts one call, its whole area as partial, and the copied keys and values as gathered bytes.

  ``density`` / ``partial`` / ``diag`` are the fractions of the score matrix the kernel's runs cover /
  cover with an additive bias (partial runs, trimmed to their kept key columns) / as causal diagonal
  blocks run with is_causal (``diag_factor`` of a dense block's time; optional in the constants file,
  ``causal_factor`` stands in); ``calls`` / ``lse_parts`` / merged elements
  come from the tiles kernel's own call groups of the plan's BlockSparse (``tiles.groups``); the
  gathers are the tile-order permutation of q, k, v and of the output (and the GQA head repeat).
  ``tiles_factor`` is fitted on a video sliding-tile plan (its shorter calls run below the dense rate).

- ``lines`` (``Plan.lines``: columns and diagonals, kernels/lines.py): ``_lines_estimate`` below.
- ``lines_native`` (the same plans in C, kernels/lines_native.py): ``_native_estimate`` below.
- ``gather`` (static masked plans, kernels/gather.py): one masked call over each query block's gathered
  keys, ``3 call_s + B H_q nb T K (elem_s(D) + mask_elem_s(D)) (1 + 8 / T) + gather_s_per_byte * gathered
  k / v bytes`` (``nb`` blocks of ``T`` queries, ``K`` keys in the widest block of each of at most two
  groups; the two factors fitted on the fixture's 1,040-token call: ``_gather_estimate``).

Kernels the model does not know (flex, triton, reference, registered ones) keep their places in
the ``PREFERENCE`` list and the modelled ones are sorted among theirs; devices without a constants
file (CUDA today) keep the ``PREFERENCE`` order; a near-tie (within 2 %) goes to the kernel
preferred first. Constants measured on a 2-core CPU under load are rough (see the JSON's machine
line): decisions near a crossover can go either way, which costs little by definition. The model only orders the capable kernels: capability stays each
kernel's ``why_not``, and every kernel is exact, so a wrong estimate costs time, never accuracy.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from ..blocks import BlockSparse

HERE = Path(__file__).resolve().parent
TIE = 0.02  # estimates within 2 % of each other keep the preference order
MAX_MODELLED_ELEMS = 1 << 21  # ... and up to this many scores per head (~1.4K tokens; beyond, tiles won)
GATHER_MARGIN = 1.3
MAX_MODELLED_D = 32  # the gather kernel's estimate holds up to this head dim (fitted at 24; at 64 and 128 it chose gather 1.4-1.9x slower)
# lines' fixed work per call (layout, tables, ~60 small tensor ops), in SDPA call overheads: measured
# ~0.3 ms at 64 tokens on the 2-core CPU, where one masked SDPA call is cheaper
LINES_FIXED_CALLS = 40
GROUP_FIXED_CALLS = 10  # and per further KV head group (its tables and row checks: ~10 small ops)
# the analytic sum above against the kernel measured alone on its plans (VerticalSlash / Power, 64-8K tokens, 9 heads
# of 64 and 32 of 128, 1 and 2 threads, AMD EPYC 2-core, 2026-12-05): 1.3-3.3x, median 1.9 (it ranked lines ahead of
# lines_native for Power at 4K-8K, where lines took 1.5-1.9x lines_native's time)
LINES_FACTOR = 1.9
# lines_native: its fixed work (per head: numpy runs and offset table, the columns' gather; threads) in SDPA call
# overheads, and its time per computed score over dense SDPA's per element. Fitted (least squares on relative error)
# to the kernel alone on its plans, VerticalSlash and Power at 64-4K tokens with 9 heads of 64 and 32 of 128, one
# thread, on the 2-core AMD EPYC (2026-12-05): the call costs ~0.1 ms plus ~8 us per head (64 tokens, 9 heads:
# 0.25 ms measured), a computed score ~3.5 dense elements (4K: VerticalSlash 4.0, Power 2.7)
NATIVE_FIXED_CALLS, NATIVE_HEAD_CALLS, NATIVE_FACTOR = 13, 1, 3.5
KEYS = ("call_s", "elem_s", "causal_factor", "mask_elem_s", "build_s", "build_s_per_elem", "tiles_factor",
        "lse_s", "merge_s_per_elem", "gather_s_per_byte")
_TABLES: dict = {}


def load(device_type: str) -> dict | None:
    """``{threads: constants}`` for a device kind from ``cost_<device>.json``, or None (cached)."""
    if device_type not in _TABLES:
        path = HERE / f"cost_{device_type}.json"
        table = None
        if path.exists():
            raw = json.loads(path.read_text())
            table = {int(t): c for t, c in raw.get("threads", {}).items() if all(k in c for k in KEYS)} or None
        _TABLES[device_type] = table
    return _TABLES[device_type]


def constants(device_type: str, threads: int) -> dict | None:
    """The constants measured at the thread count nearest ``threads`` (None: not calibrated)."""
    table = load(device_type)
    if not table:
        return None
    return table[min(table, key=lambda t: (abs(t - threads), t))]


def per_d(table: dict, D: int) -> float:
    """A per-head-dim constant (``{"32": x, "64": y, ...}``) at head dim ``D``: linear between the
    measured dims; beyond the largest, proportional to D (the work per score is); below the
    smallest, the smallest's."""
    pts = sorted((int(d), float(x)) for d, x in table.items())
    if D <= pts[0][0]:
        return pts[0][1]
    for (d0, x0), (d1, x1) in zip(pts, pts[1:]):
        if D <= d1:
            return x0 + (x1 - x0) * (D - d0) / (d1 - d0)
    return pts[-1][1] * D / pts[-1][0]


@functools.lru_cache(maxsize=64)
def gather_costs(device_type: str, threads: int, D: int) -> tuple | None:
    """(call_s, lse_s, merge_s_per_elem, gather_s_per_byte, mask_elem_s at D): what tile_runs weighs to
    gather a grid group's key runs (``tile_runs._grid_gathers``); None without constants for the device."""
    c = constants(device_type, threads)
    if c is None:
        return None
    return c["call_s"], c["lse_s"], c["merge_s_per_elem"], c["gather_s_per_byte"], per_d(c["mask_elem_s"], D)


def work_of(q, v) -> tuple:
    """The call facts the tiles kernel's grid groups depend on (``tile_runs.groups``' ``work``)."""
    B, Hq, _, D = q.shape
    return B * Hq, D, v.shape[3], q.element_size(), gather_costs(q.device.type, threads(), D)


def block_stats(bs: BlockSparse, plan=None, device=None, work: tuple | None = None) -> dict:
    """What the tiles kernel does for ``bs`` (with ``plan``: its refined runs, ``tiles.groups``; cached
    on ``bs``): the fractions of the score matrix its calls compute with no mask (``density``, partial
    and causal-diagonal runs included), with a bias (``partial``) and as causal diagonal blocks
    (``diag``), SDPA calls, LSE parts, merged query rows (times parts), and whether there is a permutation."""
    from . import tile_runs as tiles  # same module family; groups are cached on bs

    key = ("cost_stats", plan is not None and tiles.REFINE, tiles.GATHER_FACTOR, tiles.SPLIT_ROWS, work)
    if key in bs.cache:
        return bs.cache[key]
    calls = lse = merged = gathered = 0
    area = {False: 0, True: 0, tiles.CAUSAL: 0}  # computed score elements per run kind
    for g in tiles.groups(bs, plan, device, work):
        if g.gather:  # one masked call over the runs' keys copied side by side
            calls += 1
            gathered += g.n * sum(r[2] for r in g.runs)
            area[all(r[3] is True for r in g.runs)] += g.n * g.L * sum(r[2] for r in g.runs)  # unmasked when all full
            continue
        if len(g.runs) == 1 and g.runs[0][3]:
            calls += 1
        else:
            calls += len(g.runs)
            lse += len(g.runs)
            merged += g.n * g.L * len(g.runs)
        for _, _, lk, f in g.runs:
            area[f] += g.n * g.L * lk
    qs, ks = bs.pair_sizes()
    S2 = bs.seq_len ** 2
    stats = dict(density=sum(area.values()) / S2, partial=area[False] / S2, diag=area[tiles.CAUSAL] / S2, calls=calls,
                 lse_parts=lse, merged_rows=merged, gathered_rows=gathered, perm=bs.perm is not None,
                 keeps_all=bool(bs.kv_full.all()) and int((qs * ks).sum()) == S2)
    bs.cache[key] = stats
    return stats


def estimate(name: str, c: dict, q, k, v, plan, mask=None) -> float:
    """Estimated seconds of kernel ``name`` for this call under constants ``c``; inf when the
    model does not know the kernel."""
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    E = B * Hq * Sq * Skv  # score elements
    dense = E * per_d(c["elem_s"], D)
    read_mask = E * per_d(c["mask_elem_s"], D)
    # the tiles kernel's groups for this call's shape (grid groups gather by it: tile_runs._grid_gathers)
    stats = None if plan.blocks is None else \
        block_stats(plan.blocks, plan, q.device, None if plan.blocks.causal else work_of(q, v))
    if name == "sdpa":
        if plan.mask_mod is None and mask is None:
            causal = plan.causal and plan.q_offset == 0
            return c["call_s"] + dense * (c["causal_factor"] if causal else 1.0)
        if stats is not None and stats["keeps_all"] and plan.static and mask is None and not plan.causal:
            return c["call_s"] + dense  # the cached mask keeps everything: plain SDPA
        from .sdpa import MASKS, flash_skips_causal  # a static plan's mask is cached unless it is larger than the cache

        cached = plan.static and Sq * Skv * q.element_size() <= MASKS.max_bytes
        # a data-dependent lines plan (VerticalSlash: columns and diagonals picked per head) builds a mask per query
        # head; a static one (Power) one mask for every head
        per_head = plan.lines is not None and not plan.static
        build = 0.0 if cached else c["build_s"] + B * (Hq if per_head else 1) * Sq * Skv * c["build_s_per_elem"]
        # only a static plan's cached mask runs the CPU flash kernel with is_causal (kernels/sdpa.py: _causal_flash);
        # a data-dependent one computes every score under its materialised mask
        causal = plan.static and flash_skips_causal(q, k, v, plan)
        return c["call_s"] + (dense + read_mask) * (c["causal_factor"] if causal else 1.0) + build
    if name == "tiles":
        if stats is None:
            return math.inf
        rep_or_perm = stats["perm"] or Hq != k.shape[1]
        gathered = (B * Hq * (Sq + 2 * Skv) * D + (B * Hq * Sq * v.shape[3] if stats["perm"] else 0)) * q.element_size()
        # causal diagonal blocks: is_causal skips the key chunks above the diagonal (diag_factor, measured on
        # one 256-token block; the whole-matrix causal_factor before it was calibrated)
        diag_saved = stats["diag"] * (1.0 - c.get("diag_factor", c["causal_factor"]))
        return (c["call_s"] * stats["calls"] + (stats["density"] - diag_saved) * dense * c["tiles_factor"]
                + stats["partial"] * read_mask + c["lse_s"] * stats["lse_parts"]  # partial blocks read a bias
                + c["merge_s_per_elem"] * B * Hq * stats["merged_rows"] * v.shape[3]
                + (c["gather_s_per_byte"] * gathered if rep_or_perm else 0.0)
                + c["gather_s_per_byte"] * B * Hq * stats["gathered_rows"] * (D + v.shape[3]) * q.element_size())
    if name == "lines":
        return _lines_estimate(c, q, k, v, plan)
    if name == "gather":
        return _gather_estimate(c, q, k, v, plan, mask)
    if name == "lines_native":
        return _native_estimate(c, q, k, v, plan)
    return math.inf


def _gather_estimate(c: dict, q, k, v, plan, mask) -> float:
    """kernels/gather.py: one masked SDPA call over each query block's gathered keys (its layout, derived
    once per static plan, gives the block height and the widest block), plus the gathers of k and v."""
    from .gather import BLOCK_OVERHEAD, GATHER_WEIGHT, MAX_ELEMS, best_rows, layout  # same module family

    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    if plan.mask_mod is None or not plan.static or plan.score_mod is not None or mask is not None or Sq * Skv > MAX_ELEMS:
        return math.inf
    if D > MAX_MODELLED_D:  # measured at D 64 (SmolLM2 SinkWindow 1K) and 128 (Wan 4x16x16): the gathers cost more than the
        return math.inf  # calls save, which this model does not capture; left to the kernels it knows there
    if Sq * Skv > MAX_MODELLED_ELEMS:  # the fixture at 4K tokens: tiles ran 0.60-0.67x stock where gather ran 0.78-0.89x
        return math.inf
    lay = layout(plan, Sq, Skv, q.device, best_rows(plan, q, k))
    elems = B * Hq * lay["cost"] * (1 + BLOCK_OVERHEAD / lay["rows"])
    gathered = GATHER_WEIGHT * B * Hq * lay["cost"] // lay["rows"] * (D + v.shape[3]) * q.element_size()
    perm = B * Hq * Sq * (D + v.shape[3]) * q.element_size() if lay["slot"] is not None else 0  # q in, out back
    est = (c["call_s"] * 3 * len(lay["groups"]) + c["gather_s_per_byte"] * (perm + gathered)
           + elems * (per_d(c["elem_s"], D) + per_d(c["mask_elem_s"], D)))
    return est * GATHER_MARGIN  # measured 1.2-1.3x above this at 2 threads (its blocks parallelise worse): near-ties lose


def _lines_estimate(c: dict, q, k, v, plan) -> float:
    """kernels/lines.py, per KV head group: its fused calls over each query block's key ranges (copied side
    by side when there are several) read a bias built in one pass (``2 * mask_elem_s`` per element: the
    build and the kernel's read; rated like a tiles call), one call over the gathered columns outside those
    ranges (a mask built per element), the reversed copies of k and v, and a merge where there are columns.
    From the calibrated constants, scaled by ``LINES_FACTOR`` (measured against the sum)."""
    if plan.lines is None:
        return math.inf
    from .lines_layout import DIAG_KEYS, block_rows, groups, layout  # same module family; layouts cached on plan.lines

    B, Hq, Sq, D = q.shape
    G = k.shape[1] if q.device.type == "cpu" and v.shape[3] == D else Hq  # elsewhere k, v are repeated per head
    copies = c["gather_s_per_byte"] * B * G * k.shape[2] * (D + v.shape[3]) * q.element_size()
    T = block_rows(plan.lines, Sq, q.device)
    subs = groups(plan.lines, G, Sq, k.shape[2], plan.q_offset, T)
    lays = [layout(sub, Sq, k.shape[2], plan.q_offset, T) for sub in subs]
    G = len(subs)
    elem, bias = per_d(c["elem_s"], D), per_d(c["mask_elem_s"], D)
    area = B * (Hq // G) * sum(lay["area"] for lay in lays)  # scores computed in the ranges
    vertical = sum(lay["vertical"] for lay in lays)  # scores of the gathered columns (batch and heads counted)
    ranges = area * (elem * c["tiles_factor"] + 2 * bias)
    cols = vertical * (elem + bias + c["build_s_per_elem"])
    merge = c["merge_s_per_elem"] * 2 * B * Hq * Sq * v.shape[3] * sum(bool(lay["vertical"]) + bool(lay["apart"]) for lay in lays) / G
    # diagonals run apart: each of their scores costs DIAG_KEYS scores of a range (the layout's own rule)
    apart = DIAG_KEYS * B * (Hq // G) * sum(lay["diagonal"] for lay in lays) * (elem * c["tiles_factor"] + 2 * bias)
    calls = sum(lay["calls"] for lay in lays)
    return LINES_FACTOR * (c["call_s"] * (LINES_FIXED_CALLS + GROUP_FIXED_CALLS * (G - 1) + calls) + ranges + cols + merge
                           + apart + copies)


def _native_estimate(c: dict, q, k, v, plan) -> float:
    """kernels/lines_native.py: its fixed work per call and per head, and the scores it computes (``computed``: each
    block's key ranges and columns) at ``NATIVE_FACTOR``."""
    if plan.lines is None:
        return math.inf
    from .lines_native import computed  # same module family

    B, Hq, Sq, D = q.shape
    scores = B * Hq * computed(plan.lines, Sq, plan.q_offset, k.shape[2])
    return c["call_s"] * (NATIVE_FIXED_CALLS + NATIVE_HEAD_CALLS * B * Hq) + scores * per_d(c["elem_s"], D) * NATIVE_FACTOR


def rank(names: list[str], c: dict | None, q, k, v, plan, mask=None) -> tuple[list[str], dict]:
    """``names`` (in preference order) with the kernels the model knows sorted by estimated cost
    among the places they hold (unknown kernels keep theirs; near-ties keep the preference order);
    also the estimates. Without constants: ``names`` unchanged."""
    if c is None:
        return list(names), {}
    est = {n: estimate(n, c, q, k, v, plan, mask) for n in names}
    known = [n for n in names if est[n] < math.inf]
    ordered: list[str] = []
    for n in sorted(known, key=lambda n: est[n]):  # stable: equal estimates keep the preference order
        i = len(ordered)  # a near-tie goes to the kernel preferred first
        while i > 0 and est[n] <= est[ordered[i - 1]] * (1 + TIE) and names.index(ordered[i - 1]) > names.index(n):
            i -= 1
        ordered.insert(i, n)
    it = iter(ordered)
    return [next(it) if est[n] < math.inf else n for n in names], est


def threads() -> int:
    return torch.get_num_threads()

"""The per-pixel loop of one image as a compiled kernel (numba, Debian's
python3-numba), with the numpy path of :mod:`image` as the fallback.

Two passes over a panel's raster do what the numpy path does in about a
dozen: a branch-free one (the compiler vectorises it) applies the masks
(static + resolution + dynamic, trusted range, Bragg and the optional
intensity filter) and computes the voxel key of every kept pixel; the second
finds the runs of equal keys along the raster, sums each run (pixels,
photons, correction factor, q, background) and adds the sums run by run
into a hash table that stays in the CPU cache (a row of runs meets the same
few hundred voxels as the row before). The dynamic mask's sums and local
medians are compiled here too.

The voxel's grid coordinates are computed with the same float32 operations
in the same order as :class:`image.VoxelKeys` (no BLAS, no fused
multiply-add) and combined into the key exactly (in float64, integers below
2^53), so both paths give the same keys and pixel counts bit for bit; their float64 sums of the
same float32 values differ only in the order of the additions.
"""

from __future__ import annotations

import logging

import numpy as np

from dials_diffuse import compiled, grid

logger = logging.getLogger("dials.diffuse_extract")

#: columns of a VoxelTable's sums, in order; background only with a
#: per-pixel background map
SUM_COLUMNS = ("n_pixels", "photons", "factor", "qx", "qy", "qz", "background")

_KERNELS = {}
_TABLES = {}  # n_columns: VoxelTable, reused by every image of this process


def available() -> bool:
    """True when numba imports (the kernels compile, or load from numba's
    cache, on first use)."""
    if "ok" not in _KERNELS:
        try:
            _KERNELS.update(_define())
            _KERNELS["ok"] = True
        except Exception as e:  # no numba, or one that does not work here
            logger.debug("Compiled kernels unavailable (%s): the numpy path is used", e)
            _KERNELS["ok"] = False
    return _KERNELS["ok"]


def use_compiled(choice) -> bool:
    """Whether the extraction runs the compiled kernel (compiled.use_compiled's
    rule for kernel=auto|numba|numpy)."""
    return compiled.use_compiled(choice, choice != "numpy" and available())


def warm_up(counts_dtype, with_background=False):
    """Compile (or load from numba's cache) the kernel for images of
    ``counts_dtype`` now: a parent does it once before forking workers,
    which then inherit the machine code."""
    n = 4
    for key_dtype in (np.int32, np.int64):
        VoxelTable(7).add_panel(
            np.zeros((3, n), np.float32), np.zeros(n, counts_dtype), np.ones(n, bool),
            np.ones(n, bool), (-1, 1e6), np.ones(n, np.float32),
            np.zeros(n) if with_background else None, 1.0, np.eye(3, dtype=np.float32),
            np.zeros(3, np.float32), np.ones(3, np.int64), key_dtype)


def local_level_median(image):
    """masks.local_level_median compiled: the same medians (a median of 5 is
    one of the 5 values), 20x faster than scipy's two rank filters."""
    rows = _KERNELS["median5_rows"](np.ascontiguousarray(image, np.float64))
    return _KERNELS["median5_columns"](rows)


def mean_counts(sum_counts, n_valid):
    """masks.DynamicMaskAccumulator's mean count per pixel, sum / max(n, 1)
    in float64, compiled: one array instead of three."""
    return _KERNELS["mean_counts"](sum_counts, n_valid)


def dynamic_verdict(mean, local, sum_counts, n_hot, n_valid, hot_min, hot_ratio, dead_min):
    """masks.DynamicMaskAccumulator.masks' decision, compiled, in one pass:
    True where a pixel is neither hot (n_hot >= hot_min or mean > hot_ratio
    local + 10) nor dead (no counts where local n_valid >= dead_min). The
    numpy expressions made eight temporaries of a 6M panel's size."""
    return _KERNELS["dynamic_verdict"](mean, local, sum_counts, n_hot, n_valid,
                                       float(hot_min), float(hot_ratio), float(dead_min))


def add_dynamic_panel(data, low, high, threshold, sum_counts, n_hot, n_valid):
    """masks.DynamicMaskAccumulator.add's sums of one panel, compiled, in
    place: the same integer (or float64) sums, one pass instead of four."""
    if np.issubdtype(data.dtype, np.integer):
        low, high, threshold = _int64_bounds(np.floor(low), np.ceil(high), np.ceil(threshold))
    else:
        low, high, threshold = float(low), float(high), float(threshold)
    _KERNELS["add_dynamic"](np.ascontiguousarray(data).reshape(-1), low, high, threshold,
                            sum_counts.reshape(-1), n_hot.reshape(-1), n_valid.reshape(-1))


def _int64_bounds(*values):
    """Whole-number bounds as int64, clipped to its range (a trusted range
    may exceed the image's integer type, or be 1e300)."""
    bound = float(2**62)
    return tuple(np.int64(np.clip(v, -bound, bound)) for v in values)


class VoxelTable:
    """Per-voxel sums of one image in a hash table (open addressing, linear
    probing; it doubles when half full). Each slot is one 64-byte cache
    line: the key (int64, -1 when free) and up to 7 float64 sums (columns
    SUM_COLUMNS), read through an int64 and a float64 view of one buffer
    (a run's key and sums meet one line, not one in a key array and one in
    a sums array)."""

    def __init__(self, n_columns, capacity=2**16):
        if n_columns > SLOT_WIDTH - 1:
            raise ValueError(f"a slot holds at most {SLOT_WIDTH - 1} sums")
        self.n_columns = n_columns
        self.slots = _aligned_slots(capacity)
        self.slots[:, 0] = -1
        self.n_used = 0

    @property
    def slot_sums(self):
        """The slots as float64 (column 0 is the key's bits, 1.. the sums)."""
        return self.slots.view(np.float64)

    @classmethod
    def empty(cls, n_columns):
        """This process's table of n_columns, emptied: its pages are reused
        from image to image (fresh pages cost a page fault each)."""
        table = _TABLES.get(n_columns)
        if table is None:
            table = _TABLES[n_columns] = cls(n_columns)
        else:
            _KERNELS["clear_slots"](table.slots)
            table.n_used = 0
        return table

    def add_panel(self, q_t, counts, usable, bragg, trusted_range, factor, background,
                  gain, to_grid, lower, strides, key_dtype=np.int64):
        """Add a panel raster's kept pixels (``usable``, inside the trusted
        range and ``bragg``). Returns the runs' layout {"start", "n"} (first
        raster index and length of each run of kept pixels with one key)
        and the pixels kept after the trusted range and after ``bragg``.
        ``key_dtype``: int32 when every key of the image's box is below 2^31."""
        n = counts.size
        low, high = trusted_range
        if np.issubdtype(counts.dtype, np.integer):
            # low < v < high <=> floor(low) < v < ceil(high) for integers,
            # compared as int64 (a trusted range may exceed the image's type)
            low, high = _int64_bounds(np.floor(low), np.ceil(high))
        else:
            low, high = float(low), float(high)
        start, length = _scratch("start", n, np.int32), _scratch("length", n, np.int32)
        # one compiled specialisation: float64 background, or none
        background = np.zeros(0) if background is None else np.asarray(background, np.float64)
        to_grid = np.ascontiguousarray(to_grid, np.float32)
        lower = np.ascontiguousarray(lower, np.float32)
        strides = np.ascontiguousarray(strides, np.int64)
        # int32 keys (half the memory traffic) when the image's key box allows
        pixel_keys = _scratch("pixel_keys", n, np.dtype(key_dtype))
        n_trusted, n_kept = _KERNELS["panel_keys"](
            q_t, counts, usable, bragg, low, high, to_grid, lower, strides, pixel_keys)
        first = n_runs = 0
        while first < n:
            first, self.n_used, n_runs = _KERNELS["add_runs"](
                pixel_keys, q_t[0], q_t[1], q_t[2], counts, factor, background, float(gain),
                self.slots, self.slot_sums, _hash_shift(len(self.slots)), self.n_used, first,
                n_runs, start, length)
            if first < n:
                self._grow()
        layout = {"start": start[:n_runs].astype(np.int64), "n": length[:n_runs].astype(np.int64)}
        return layout, (n_trusted, n_kept)

    def _grow(self):
        """Twice the capacity, every voxel in its new slot."""
        old = self.slots[self.slots[:, 0] >= 0]
        self.slots = _aligned_slots(2 * len(self.slots))
        self.slots[:, 0] = -1
        slots = _KERNELS["insert_keys"](self.slots, old[:, 0].copy(), _hash_shift(len(self.slots)))
        self.slots[slots] = old
        _TABLES[self.n_columns] = self

    def voxels(self):
        """(keys sorted, (m, n_columns) sums) of the voxels."""
        # compacted first: the sorted order then gathers from 3 MB, not from
        # the 8 MB table (measured 9-12 ms against 13-15 ms per 6M image)
        keys, sums = _KERNELS["used_entries"](self.slots, self.slot_sums, self.n_used,
                                              self.n_columns)
        order = grid.sort_keys(keys)
        return keys[order], sums[order]


#: int64 words per hash-table slot: the key and 7 sums, one cache line
SLOT_WIDTH = 8


def _aligned_slots(capacity):
    """A zeroed (capacity, SLOT_WIDTH) int64 array starting on a 64-byte
    boundary, so that every slot is one cache line."""
    raw = np.zeros(capacity * SLOT_WIDTH + SLOT_WIDTH, np.int64)
    skip = (-raw.ctypes.data % 64) // 8
    return raw[skip:skip + capacity * SLOT_WIDTH].reshape(capacity, SLOT_WIDTH)


def _hash_shift(capacity):
    """64 - log2(capacity): add_panel's hash takes the top log2(capacity)
    bits of a 64-bit product."""
    return np.uint64(64 - (int(capacity).bit_length() - 1))


def _scratch(name, n, dtype):
    """A per-process buffer of at least n elements, reused from image to
    image (fresh pages cost a page fault each)."""
    buffer = _KERNELS.get(("scratch", name))
    if buffer is None or buffer.size < n or buffer.dtype != dtype:
        buffer = _KERNELS[("scratch", name)] = np.empty(n, dtype)
    return buffer[:n]


def _define():
    from dials_diffuse.compiled import import_numba

    numba = import_numba()

    jit = numba.njit(cache=True, nogil=True)

    @jit
    def panel_keys(q_t, counts, usable, bragg, low, high, to_grid, lower, strides, out_key):
        """Each pixel's voxel key, -1 where it is not kept (``usable``,
        inside the trusted range, ``bragg``); branch-free, so the compiler
        vectorises it. Returns (pixels trusted, pixels kept)."""
        m00, m01, m02 = to_grid[0, 0], to_grid[0, 1], to_grid[0, 2]
        m10, m11, m12 = to_grid[1, 0], to_grid[1, 1], to_grid[1, 2]
        m20, m21, m22 = to_grid[2, 0], to_grid[2, 1], to_grid[2, 2]
        l0, l1, l2 = lower[0], lower[1], lower[2]
        f0, f1 = np.float64(strides[0]), np.float64(strides[1])
        magic = np.float32(12582912.0)
        n_trusted = 0
        n_kept = 0
        for i in range(counts.size):
            c = counts[i]
            trusted = usable[i] & (c > low) & (c < high)
            kept = trusted & bragg[i]
            n_trusted += trusted
            n_kept += kept
            qx, qy, qz = q_t[0, i], q_t[1, i], q_t[2, i]
            # float32, each product and sum rounded on its own as numpy's
            # elementwise ops; + 1.5 2^23 - 1.5 2^23 is rint (half to even)
            # for |g| < 2^22
            g0 = ((m00 * qx + m01 * qy + m02 * qz) + magic) - magic - l0
            g1 = ((m10 * qx + m11 * qy + m12 * qz) + magic) - magic - l1
            g2 = ((m20 * qx + m21 * qy + m22 * qz) + magic) - magic - l2
            # in float64 (exact: integers below 2^53), converted once to the
            # key's type: AVX2 vectorises float64 -> int32, not int64 maths
            k = np.float64(g0) * f0 + np.float64(g1) * f1 + np.float64(g2)
            out_key[i] = out_key.dtype.type(k) if kept else -1
        return n_trusted, n_kept

    @jit
    def add_runs(pixel_keys, qx, qy, qz, counts, factor, background, gain, slots, slot_sums,
                 shift, n_used, first, n_runs, out_start, out_length):
        """The runs of equal keys from pixel ``first`` on, their sums into the
        table (``slots``: key in column 0; ``slot_sums``: the same memory as
        float64, sums in columns 1..); stops early, at the start of a run,
        when the table is half full (the caller grows it and goes on from
        there). Returns (next pixel, voxels in the table, runs)."""
        n = pixel_keys.size
        with_background = background.size > 0
        mask = slots.shape[0] - 1
        full = slots.shape[0] // 2
        i = first
        while i < n:
            k = pixel_keys[i]
            j = i + 1
            while j < n and pixel_keys[j] == k:
                j += 1
            if k >= 0:
                if n_used >= full:  # pixel i starts the next call's first run
                    return i, n_used, n_runs
                # the run's sums in registers, pixel by pixel in raster order
                r_photons = r_factor = r_qx = r_qy = r_qz = r_background = 0.0
                for p in range(i, j):
                    r_photons += counts[p]
                    r_factor += factor[p]
                    r_qx += qx[p]
                    r_qy += qy[p]
                    r_qz += qz[p]
                if with_background:
                    for p in range(i, j):
                        r_background += background[p]
                # Fibonacci hashing: the top bits of the key times 2^64 /
                # golden ratio
                slot = np.int64((np.uint64(k) * np.uint64(0x9E3779B97F4A7C15)) >> shift)
                while slots[slot, 0] >= 0 and slots[slot, 0] != k:
                    slot = (slot + 1) & mask
                if slots[slot, 0] < 0:
                    slots[slot, 0] = k
                    n_used += 1
                out_start[n_runs] = i
                out_length[n_runs] = j - i
                n_runs += 1
                slot_sums[slot, 1] += j - i
                slot_sums[slot, 2] += r_photons * gain
                slot_sums[slot, 3] += r_factor
                slot_sums[slot, 4] += r_qx
                slot_sums[slot, 5] += r_qy
                slot_sums[slot, 6] += r_qz
                if with_background:
                    slot_sums[slot, 7] += r_background
            i = j
        return n, n_used, n_runs

    @jit
    def insert_keys(slots, keys, shift):
        """Slots of new keys in a table (as add_panel finds them)."""
        mask = slots.shape[0] - 1
        out = np.empty(keys.size, np.int64)
        for j in range(keys.size):
            k = keys[j]
            slot = np.int64((np.uint64(k) * np.uint64(0x9E3779B97F4A7C15)) >> shift)
            while slots[slot, 0] >= 0:
                slot = (slot + 1) & mask
            slots[slot, 0] = k
            out[j] = slot
        return out

    @jit
    def used_entries(slots, slot_sums, n_used, n_columns):
        """The table's used slots, compacted (in slot order)."""
        keys = np.empty(n_used, np.int64)
        sums = np.empty((n_used, n_columns), np.float64)
        j = 0
        for slot in range(slots.shape[0]):
            if slots[slot, 0] >= 0:
                keys[j] = slots[slot, 0]
                for c in range(n_columns):
                    sums[j, c] = slot_sums[slot, c + 1]
                j += 1
        return keys, sums

    @jit
    def clear_slots(slots):
        """Every used slot back to free (key -1, sums 0)."""
        for slot in range(slots.shape[0]):
            if slots[slot, 0] >= 0:
                for c in range(slots.shape[1]):
                    slots[slot, c] = 0
                slots[slot, 0] = -1

    # the median of five values by Paeth's network: med3(e, max(min(a, b),
    # min(c, d)), min(max(a, b), max(c, d))); written out in each kernel (a
    # kernel that calls another jitted function of this closure is not
    # cached by numba: it recompiled in every process)
    @jit
    def median5_rows(image):
        """Median of each pixel and its two neighbours either side along a
        row, edges repeated (scipy's median_filter size (1, 5), nearest)."""
        n_rows, n = image.shape
        out = np.empty_like(image)
        for r in range(n_rows):
            for i in range(n):
                a, b = image[r, max(i - 2, 0)], image[r, max(i - 1, 0)]
                c, d = image[r, min(i + 1, n - 1)], image[r, min(i + 2, n - 1)]
                e = image[r, i]
                f = max(min(a, b), min(c, d))
                g = min(max(a, b), max(c, d))
                out[r, i] = max(min(e, f), min(max(e, f), g))
        return out

    @jit
    def median5_columns(image):
        """The same along columns (size (5, 1))."""
        n_rows, n = image.shape
        out = np.empty_like(image)
        for r in range(n_rows):
            r0, r1 = max(r - 2, 0), max(r - 1, 0)
            r3, r4 = min(r + 1, n_rows - 1), min(r + 2, n_rows - 1)
            for i in range(n):
                a, b, c, d, e = image[r0, i], image[r1, i], image[r3, i], image[r4, i], image[r, i]
                f = max(min(a, b), min(c, d))
                g = min(max(a, b), max(c, d))
                out[r, i] = max(min(e, f), min(max(e, f), g))
        return out

    @jit
    def mean_counts(sum_counts, n_valid):
        out = np.empty(sum_counts.shape, np.float64)
        for r in range(sum_counts.shape[0]):
            for i in range(sum_counts.shape[1]):
                out[r, i] = np.float64(sum_counts[r, i]) / np.float64(max(n_valid[r, i], 1))
        return out

    @jit
    def dynamic_verdict(mean, local, sum_counts, n_hot, n_valid, hot_min, hot_ratio, dead_min):
        # the same float64 operations, in the same order, as the numpy rule
        out = np.empty(mean.shape, np.bool_)
        for r in range(mean.shape[0]):
            for i in range(mean.shape[1]):
                hot = (np.float64(n_hot[r, i]) >= hot_min) | (
                    mean[r, i] > hot_ratio * local[r, i] + 10.0)
                dead = (sum_counts[r, i] == 0) & (
                    local[r, i] * np.float64(n_valid[r, i]) >= dead_min)
                out[r, i] = not (hot | dead)
        return out

    @jit
    def add_dynamic(data, low, high, threshold, sum_counts, n_hot, n_valid):
        for i in range(data.size):
            v = data[i]
            valid = (v > low) & (v < high)
            n_hot[i] += v >= threshold
            n_valid[i] += valid
            sum_counts[i] += v * valid

    return {"mean_counts": mean_counts, "dynamic_verdict": dynamic_verdict,
            "add_dynamic": add_dynamic, "median5_rows": median5_rows, "median5_columns": median5_columns, "used_entries": used_entries, "clear_slots": clear_slots, "panel_keys": panel_keys, "add_runs": add_runs, "insert_keys": insert_keys}

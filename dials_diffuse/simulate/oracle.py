"""An oracle extraction of simulated data: the extraction files of a run with
every voxel's signal replaced by the exact truth at the pixels that were kept.

Merged like the real files, it gives what the map would be with no noise and
no correction error, but the same sampling of each voxel by the pixels (and
the same Bragg masking): the reference for checks finer than the binning
(sigma calibration of fine-sliced data, per-shell ratios below 1 %).
Needs the per-pixel arrays (output.save_pixels=all).
"""

from __future__ import annotations

import os

import numpy as np

from dials_diffuse import diffuse_files


def _voxel_sums(keys, weights, columns):
    """Unique voxel keys and the weighted sums of each column."""
    voxels, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    sums = {name: np.bincount(inverse, weights=weights * v, minlength=len(voxels))
            for name, v in columns.items()}
    sums["_w"] = np.bincount(inverse, weights=weights, minlength=len(voxels))
    sums["_n"] = np.bincount(inverse, minlength=len(voxels))
    return voxels, inverse, sums


def oracle_files(truth, files, out, ndiv=4, at_mean_hkl=False, signal_truth=None):
    """Copies of the extraction files with every voxel's signal replaced by the
    truth: sum over the kept pixels of w * scale_i * flux * D(hkl) (w = the truth's
    P Omega eta T exposure), or w * D(mean hkl of the voxel's pixels), or with D
    at the hkl another truth (``signal_truth``) gives the pixel."""
    os.makedirs(out, exist_ok=True)
    total = truth.correction_total()
    written = []
    for path in files:
        arrays, meta = diffuse_files.read_image_file(path, keys=diffuse_files.VOXEL_KEYS
                                                     + diffuse_files.PIXEL_KEYS)
        i = int(meta["still_id"])
        panel = arrays["original_panel_ids"].astype(int)
        fast = arrays["original_fast_coords"].astype(int)
        slow = arrays["original_slow_coords"].astype(int)
        hkl_all = truth.hkl(i)
        hkl = np.empty((panel.size, 3))
        w = np.empty(panel.size)
        q = np.empty((panel.size, 3))
        for p in np.unique(panel):
            sel = panel == p
            hkl[sel] = hkl_all[p][slow[sel], fast[sel]]
            w[sel] = total[p][slow[sel], fast[sel]] * truth.exposure_time
            q[sel] = truth.q_lab[p].reshape(hkl_all[p].shape)[slow[sel], fast[sel]]
        keys = np.rint(hkl * np.asarray(ndiv, float)).astype(np.int32)
        voxels, inverse, sums = _voxel_sums(
            keys, w, {"h": hkl[:, 0], "k": hkl[:, 1], "l": hkl[:, 2],
                      "qmag": np.linalg.norm(q, axis=1)})
        mean_hkl = np.stack([sums[c] / sums["_w"] for c in "hkl"], axis=1)
        scale = truth.scales[i] * truth.flux
        if at_mean_hkl:
            d_pix = truth.diffuse(mean_hkl)[inverse]
        elif signal_truth is not None:
            other = signal_truth.hkl(i)
            h_other = np.empty_like(hkl)
            for p in np.unique(panel):
                sel = panel == p
                h_other[sel] = other[p][slow[sel], fast[sel]]
            d_pix = truth.diffuse(h_other)
        else:
            d_pix = truth.diffuse(hkl)
        signal = np.bincount(inverse, weights=w * scale * d_pix, minlength=len(voxels))
        new = {
            "voxel_indices": voxels.astype(np.int32),
            "voxel_sum_signal": signal,
            "voxel_sum_factor": sums["_w"],
            "voxel_sum_variance": np.maximum(signal, 1.0),
            "voxel_n_pixels": sums["_n"].astype(np.int32),
            "voxel_mean_qmag": sums["qmag"] / sums["_w"],
            "voxel_mean_hkl": mean_hkl,
        }
        missing = [k for k in diffuse_files.VOXEL_KEYS if k not in new]
        if missing:
            raise RuntimeError(f"extraction files now need {missing}: teach oracle_files them")
        target = os.path.join(out, os.path.basename(path))
        diffuse_files.write_image_file(
            target, {k: new[k] for k in diffuse_files.VOXEL_KEYS}, meta)
        written.append(target)
    return written

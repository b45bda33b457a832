"""Scripting dials_diffuse from ``dials.python`` in DIALS' own types.

In memory, no files written::

    from dials_diffuse import api

    params = api.extraction_params("grid.ndiv_h=4", "grid.ndiv_k=4", "grid.ndiv_l=4")
    pixels = api.extract_image(experiments[0], 0, params)   # flex.reflection_table
    masks = api.image_masks(experiments[0], 0, params)      # {"pixel": (flex.bool, ...), ...}

and the merged map of a ``dials.diffuse_merge`` directory as a
``cctbx.miller.array`` (:func:`merged_map`).

:func:`extract_image` returns one row per kept pixel with the columns

* ``panel`` (``flex.size_t``), ``xyzobs.px`` (``flex.vec3_double``: fast,
  slow pixel-centre coordinates, image index in the imageset),
* ``s1`` (diffracted beam, 1/Angstrom), ``q`` (= s1 - s0) and ``hkl_frac``
  (fractional Miller indices), all ``flex.vec3_double``,
* ``intensity.sum.value``, ``intensity.sum.variance`` (``flex.double``):
  corrected intensity and its Poisson variance,
* ``correction.polarization``, ``correction.solid_angle``,
  ``correction.efficiency``, ``correction.air`` (the factors the counts are
  divided by) and ``correction.total`` (their product times the exposure
  time),

and the per-image pixel counts after each mask stage in ``table.stages``
(a dict attribute, not a column). Inside, the per-pixel work runs on numpy
arrays over whole panel rasters: on 6.2 M pixels numpy is 7-8x faster than
the same operations in flex (bench/numpy_vs_flex.py, docs/PERFORMANCE.md);
the hand-over to flex here goes through flumpy (a view where the dtype
allows).
"""

from __future__ import annotations

import copy

import numpy as np
from cctbx import crystal, miller, sgtbx, uctbx
from dxtbx import flumpy
from dxtbx.model.experiment_list import ExperimentList

from dials.array_family import flex
from dials.util import Sorry

from dials_diffuse import masks, merged_files, phil_scopes
from dials_diffuse.phil_scopes import argument_interpreter
from dials_diffuse.extraction.context import clear_caches, context_for
from dials_diffuse.extraction.image import extract_image as _extract_image
from dials_diffuse.extraction.tasks import (
    check_params,
    exposure_time,
    load_background,
    plan_tasks,
)

#: the correction factors of every kept pixel
CORRECTIONS = ("polarization", "solid_angle", "efficiency", "air")

__all__ = ["extraction_params", "merge_params", "extract_image", "image_masks", "merged_map"]


def _params(scope, args, dotted):
    items = list(args) + [f"{k}={v}" for k, v in dotted.items()]
    interpreter = argument_interpreter(scope)
    return scope.fetch(sources=[interpreter.process(arg=a) for a in items]).extract()


def extraction_params(*args, **dotted):
    """Extraction parameters (``dials.diffuse_extract``'s, without its log):
    ``key=value`` strings and/or dotted keywords, e.g.
    ``extraction_params("filter.pixel_step=2", **{"grid.ndiv_h": 4})``."""
    return _params(phil_scopes.extract_params_scope, args, dotted)


def merge_params(*args, **dotted):
    """Merge parameters (``dials.diffuse_merge``'s, without its log)."""
    return _params(phil_scopes.merge_params_scope, args, dotted)


def _task(experiment, index):
    tasks, skipped = plan_tasks(ExperimentList([experiment]))
    for task in tasks:
        if task.index_in_imageset == index:
            return task
    raise Sorry(f"image {index} is not an image of this experiment with a crystal model")


def _run(experiment, index, params, background=None, dynamic_mask=None, want_masks=False):
    """(task, context, ImageResult) of one image; ``params`` is a copy."""
    params.output.save_pixels = "all"
    params.output.masks = want_masks
    ndiv = check_params(params)
    task = _task(experiment, index)
    clear_caches()  # contexts depend on the parameters
    if background is None:
        background = load_background(params, experiment.detector)
    context = context_for(task, params, parts_step=1)  # every pixel's correction factors
    result = _extract_image(task, context, params, ndiv, background, dynamic_mask)
    return task, context, result


def extract_image(experiment, index=0, params=None, background=None, dynamic_mask=None):
    """The kept pixels of image ``index`` of ``experiment`` (a dxtbx
    Experiment with a crystal), corrected, as a ``flex.reflection_table``
    (columns in the module docstring). ``params``: :func:`extraction_params`;
    ``background``: per-panel numpy arrays (default: the parameters'
    background); ``dynamic_mask``: per-panel bool arrays (hot/dead pixels),
    as the extraction run finds them over all images."""
    params = copy.deepcopy(params if params is not None else extraction_params())
    task, context, result = _run(experiment, index, params, background, dynamic_mask)
    a = result.arrays
    q = a["q_vectors"].astype(np.float64)
    panel = a["original_panel_ids"].astype(np.int64)
    fast = a["original_fast_coords"].astype(np.int64)
    slow = a["original_slow_coords"].astype(np.int64)
    table = flex.reflection_table()
    table["panel"] = flex.size_t(flumpy.from_numpy(panel.astype(np.uint64)))
    table["xyzobs.px"] = flex.vec3_double(flumpy.vec_from_numpy(np.stack(
        [fast + 0.5, slow + 0.5, np.full(fast.size, float(index))], axis=1)))
    s0 = np.array(experiment.beam.get_s0())
    table["s1"] = flex.vec3_double(flumpy.vec_from_numpy(q + s0))
    table["q"] = flex.vec3_double(flumpy.vec_from_numpy(q))
    table["hkl_frac"] = flex.vec3_double(flumpy.vec_from_numpy(a["hkl"].astype(np.float64)))
    intensity = a["intensities"].astype(np.float64)
    table["intensity.sum.value"] = flumpy.from_numpy(intensity)
    table["intensity.sum.variance"] = flumpy.from_numpy(a["sigmas"].astype(np.float64) ** 2)
    # per-pixel correction factors: the context's per-raster values at the
    # kept pixels (raster index from the full-resolution coordinates)
    parts = {k: np.empty(panel.size) for k in CORRECTIONS + ("total",)}
    for pp in context.panels:
        rows = np.flatnonzero(panel == pp.panel_id)
        raster = (slow[rows] // pp.step) * pp.shape[1] + fast[rows] // pp.step
        for k in CORRECTIONS:
            parts[k][rows] = pp.parts[k][pp.parts_index(raster)]
        parts["total"][rows] = pp.factor[raster]
    parts["total"] *= exposure_time(task, params)
    for k, values in parts.items():
        table[f"correction.{k}"] = flumpy.from_numpy(values)
    table.stages = dict(result.stages)
    return table


def image_masks(experiment, index=0, params=None, background=None, dynamic_mask=None) -> dict:
    """The masks of image ``index``: ``{"pixel", "bragg", "total"}``, each a
    tuple of ``flex.bool`` per panel (True = use), as
    ``dials.image_viewer mask=`` reads them."""
    params = copy.deepcopy(params if params is not None else extraction_params())
    _, _, result = _run(experiment, index, params, background, dynamic_mask, want_masks=True)
    return {kind: masks.to_flex(panel_masks) for kind, panel_masks in result.masks.items()}


def merged_map(directory, column="I_merged_relative"):
    """The merged map of a ``dials.diffuse_merge`` output directory as a
    ``cctbx.miller.array`` of the asymmetric-unit voxels.

    The voxel grid subdivides each reciprocal-lattice unit ndiv_h x ndiv_k x
    ndiv_l times, so the voxels are the Miller indices of a supercell (edges
    ndiv_h a, ndiv_k b, ndiv_l c): the array's indices are the voxel indices
    and its crystal symmetry that supercell in P 1 (``d_spacings()`` are the
    voxels' resolutions). ``column``: ``I_merged_relative`` (with
    ``Sigma_merged_relative`` as sigmas), ``I_anisotropic`` or
    ``I_isotropic``. The crystal's own symmetry is ``array.info()``'s
    ``crystal_symmetry``.
    """
    grid, _, voxels, _ = merged_files.read_merged(str(directory))
    ndiv = np.array([grid["ndiv_h"], grid["ndiv_k"], grid["ndiv_l"]], float)
    cell = np.array(grid["crystal_avg_ref"]["unit_cell"], float)
    supercell = uctbx.unit_cell(list(cell[:3] * ndiv) + list(cell[3:]))
    symmetry = crystal.symmetry(supercell, space_group=sgtbx.space_group())
    index = np.asarray(voxels["voxel_indices"], np.int32)
    indices = flex.miller_index(*(flumpy.from_numpy(np.ascontiguousarray(index[:, k]))
                                  for k in range(3)))
    data = flumpy.from_numpy(np.asarray(voxels[column], np.float64))
    sigmas = None
    if column == "I_merged_relative":
        sigmas = flumpy.from_numpy(np.asarray(voxels["Sigma_merged_relative"], np.float64))
    ms = miller.set(symmetry, indices, anomalous_flag=True)
    array = miller.array(ms, data=data, sigmas=sigmas)
    own = crystal.symmetry(
        uctbx.unit_cell(list(cell)),
        space_group=sgtbx.space_group(grid["crystal_avg_ref"]["space_group_hall"]))
    return array.set_info(miller.array_info(source=str(directory), labels=[column],
                                            crystal_symmetry_from_file=own))

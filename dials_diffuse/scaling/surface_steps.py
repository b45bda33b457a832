"""The refinement steps of mdx2's smooth scaling terms
(:mod:`dials_diffuse.scaling.surfaces`): per iteration, one Gauss-Newton
step per term on the joint least squares in (term, I) with the intensities
eliminated, the radial factor h(|s|), and the per-row columns rewritten."""

from __future__ import annotations

import numpy as np
import scipy.sparse

from dials_diffuse.scaling.gauss_newton import sampled_voxels
from dials_diffuse.scaling.merge_sums import model_variance, prediction
from dials_diffuse.scaling.passes import chunk_slices, observation_chunk
from dials_diffuse.surface_model import normal_equations, solve


#: weight of the offset's pull towards 0, relative to the largest diagonal
#: element of its normal matrix (mdx2's offset.alpha_min; with 1e-3 the
#: offset and the scales traded the isotropic part of the map without
#: converging, measured on 72 simulated images)
OFFSET_RIDGE = 1e-2


#: weight of the pin on each ring mean of a gain term's step, relative to
#: the mean diagonal of its normal matrix (measured: 100 slowed the
#: simulated fits, gain CC 0.96 -> 0.94 in 20 iterations; 0.1 let the real
#: L-cysteine wedges wander for ten iterations; 1 did neither)
RING_PIN = 1.0


#: couplings (row corners) used for the Schur complement's matrix
MAX_SCHUR_COUPLINGS = 500_000


#: Levenberg-Marquardt damping of the surfaces' steps, relative to the mean
#: diagonal of the normal matrix
DAMPING = 1e-4


#: the surfaces' steps use the observations of every k-th voxel, with k such
#: that about this many rows are used: a few hundred smooth parameters need
#: no more, and the step's cost stays flat in the size of the data set
MAX_FIT_ROWS = 2_000_000


def _sampled_rows(obs, use, a, b, sampled):
    """Indices of the used rows a:b whose voxel is in the sample."""
    rows = np.arange(a, b)
    keep = use[a:b] if sampled is None else use[a:b] & sampled[obs.voxel[a:b]]
    return rows[keep]


def _step_partition(rows, part, surfaces, name, model, intensity, sampled):
    """The sums of a Gauss-Newton step of one term's control values c on the
    joint least squares in (c, I) over the partition's sampled rows, the
    other terms and blocks held: the normal matrix and gradient in c, the
    diagonal and gradient in I, the change of the expected counts in each
    ring of |s| per unit change of each control value (gain terms), and the
    (control, voxel) couplings."""
    obs, use = rows.obs, rows.use
    surface = getattr(surfaces, name)
    k, n_vox = surface.grid.size, obs.n_voxels
    radial = surfaces.radial
    n_rings = radial.grid.size if radial is not None else 0
    normal, gradient = np.zeros((k, k)), np.zeros(k)
    ring_moments = np.zeros(n_rings * k)
    d_voxel, g_voxel = np.zeros(n_vox), np.zeros(n_vox)
    couplings = [[], [], []]
    for sl in chunk_slices(part.start, part.stop):
        index = _sampled_rows(obs, use, sl.start, sl.stop, sampled)
        if index.size == 0:
            continue
        ch = observation_chunk(obs, index)
        b, _, expected = prediction(ch, model, intensity)
        slope = ch.factor * b * model.observation_factor(ch)  # dE[S]/dI_v
        w = 1.0 / model_variance(ch, expected)
        resid = ch.signal - expected
        coordinates = surface.row_coordinates(obs, index)
        basis = surface.grid.basis(coordinates)
        # dE[S]/dc_j = B_j(x) times everything but this term
        other = ch.factor if name == "offset" else expected / obs.surface_terms[name][index]
        n, g = normal_equations(surface.grid, coordinates, resid, other, w, basis=basis)
        normal += n
        gradient += g
        d_voxel += np.bincount(ch.voxel, w * slope * slope, n_vox)
        g_voxel += np.bincount(ch.voxel, w * slope * resid, n_vox)
        corner_index, corner_weight = basis
        if name != "offset" and n_rings:
            ring_index, ring_weight = radial.grid.basis(radial.row_coordinates(obs, index))
            for r in range(ring_index.shape[0]):
                for m in range(corner_index.shape[0]):
                    ring_moments += np.bincount(
                        ring_index[r] * k + corner_index[m],
                        ring_weight[r] * corner_weight[m] * other, n_rings * k)
        for m in range(corner_index.shape[0]):
            couplings[0].append(corner_index[m].astype(np.int32))
            couplings[1].append(ch.voxel.astype(np.int32))
            couplings[2].append(w * corner_weight[m] * other * slope)
    empty = [np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0)]
    return [normal, gradient, d_voxel, g_voxel, ring_moments] + [
        np.concatenate(c) if c else e for c, e in zip(couplings, empty)]


def _radial_partition(rows, part, surfaces, model, intensity, sampled):
    """Normal equations of h(|s|) ~ a d over the partition's sampled rows,
    weighted by the signal the gain multiplies."""
    obs, use = rows.obs, rows.use
    radial = surfaces.radial
    k = radial.grid.size
    normal, rhs = np.zeros((k, k)), np.zeros(k)
    for sl in chunk_slices(part.start, part.stop):
        index = _sampled_rows(obs, use, sl.start, sl.stop, sampled)
        if index.size == 0:
            continue
        ch = observation_chunk(obs, index)
        # E[S] without the gain a d / h: the signal the gain multiplies
        signal = prediction(ch, model, intensity)[2] / obs.surface_gain[index]
        n, r = normal_equations(radial.grid, radial.row_coordinates(obs, index),
                                surfaces.product(obs, index), np.ones(index.size), signal)
        normal += n
        rhs += r
    return normal, rhs


def _evaluate_partition(rows, part, surface):
    """Write one term's value at each of the partition's rows into its column."""
    obs = rows.obs
    column = obs.surface_offset if surface.name == "offset" else obs.surface_terms[surface.name]
    for sl in chunk_slices(part.start, part.stop):
        column[sl] = surface.evaluate(surface.row_coordinates(obs, sl))
    return (np.zeros(1),)


def _gain_partition(rows, part, surfaces):
    """Write the gain a d / h(|s|) of the partition's rows; returns the sum
    of the squared relative changes of their gains."""
    obs, radial = rows.obs, surfaces.radial
    change = 0.0
    for sl in chunk_slices(part.start, part.stop):
        gain = surfaces.product(obs, sl) / radial.evaluate(radial.row_coordinates(obs, sl))
        change += float(np.sum((gain / obs.surface_gain[sl] - 1.0) ** 2))
        obs.surface_gain[sl] = gain
    return (np.array([change]),)


def update_surfaces(passes, model, intensity, surfaces) -> float:
    """One Gauss-Newton step for every enabled term in turn (each given the
    others), normalised, then the radial factor, with the shared per-row
    columns rewritten after each. Returns the change: the rms relative change
    of the rows' gains (the largest change is dominated by the rows in the
    surfaces' least determined corners, which hardly touch the map), or the
    largest change of an offset control value relative to the mean merged
    intensity."""
    change = 0.0
    level = float(np.mean(np.abs(intensity))) or 1.0
    sampled = voxel_sample(passes.obs)
    for surface in surfaces.terms():
        old = surface.values.copy()
        _gauss_newton_step(passes, surfaces, surface, model, intensity, sampled)
        surfaces.normalise(surface.name)
        passes.reduce(_evaluate_partition, surface)
        if surface.name == "offset":
            change = max(change, float(np.max(np.abs(surface.values - old))) / level)
            continue
        normal, rhs = passes.reduce(_radial_partition, surfaces, model, intensity, sampled)
        surfaces.radial.values = solve(surfaces.radial.grid, normal, rhs,
                                       surfaces.radial.smoothness[0], prior=1.0)
        squared_change, = passes.reduce(_gain_partition, surfaces)
        change = max(change, float(np.sqrt(squared_change[0] / passes.obs.n_obs)))
    return change


def voxel_sample(obs):
    """Bool per voxel: the voxels whose rows the steps use (every k-th, about
    MAX_FIT_ROWS rows), None for all."""
    every = -(-obs.n_obs // MAX_FIT_ROWS)
    return None if every <= 1 else sampled_voxels(obs.n_voxels, every)


def _gauss_newton_step(passes, surfaces, surface, model, intensity, sampled):
    """c += the Gauss-Newton step of the joint least squares in (c, I) with
    the intensities eliminated (their Schur complement), plus the roughness
    penalty.

    Alternating between c and I converges slowly: a voxel is seen at a few
    nearby detector positions, so a change of the surface there is nearly
    a change of the voxel's intensity, and each alternation undoes only part
    of it (ten times slower, measured). Eliminating I moves both together."""
    normal, gradient, d_voxel, g_voxel, ring_moments, corner, voxel, coupling = passes.reduce(
        _step_partition, surfaces, surface.name, model, intensity, sampled, concat=(5, 6, 7))
    k = surface.grid.size
    inv_d = np.where(d_voxel > 0, 1.0 / np.where(d_voxel > 0, d_voxel, 1.0), 0.0)
    # the gradient's coupling term is exact; the matrix's (sum over voxels
    # of products of their couplings) is estimated from every n-th voxel
    # beyond MAX_SCHUR_COUPLINGS (a quasi-Newton step, the same fixed point)
    rhs = gradient - np.bincount(corner, coupling * (g_voxel * inv_d)[voxel], k)
    every = max(1, -(-coupling.size // MAX_SCHUR_COUPLINGS))
    if every > 1:
        keep = voxel % every == 0
        corner, voxel, coupling = corner[keep], voxel[keep], coupling[keep]
    scaled = scipy.sparse.csr_matrix((coupling * np.sqrt(every * inv_d[voxel]), (corner, voxel)),
                                     shape=(k, d_voxel.size))
    hessian = normal - (scaled @ scaled.T).toarray()
    values = surface.values.ravel()
    diagonal = max(float(np.trace(normal)) / k, 1e-300)
    penalty = surface.penalty(normal)
    if surface.name == "offset":
        # mdx2's alpha_min: a light pull towards 0 where the data say nothing
        penalty += OFFSET_RIDGE * float(np.max(np.diag(normal))) * np.eye(k)
    hessian += penalty
    rhs -= penalty @ values
    if surface.name != "offset":
        # the term's overall factor is free (I takes it back): pin it
        direction = values / np.linalg.norm(values)
        hessian += diagonal * np.outer(direction, direction)
        # so is its mean over each ring of |s| (the map's isotropic part
        # takes it back; h divides it out): unpinned, steps along it made
        # the refinement wander on real 1.5 degree wedges
        for moment in ring_moments.reshape(-1, k):
            norm = np.linalg.norm(moment)
            if norm > 0:
                hessian += RING_PIN * diagonal * np.outer(moment, moment) / norm ** 2
    # a light damping: directions the data hardly fix (a gain that depends
    # on |s| alone is the map's isotropic part) move slowly, not wildly
    hessian += DAMPING * diagonal * np.eye(k)
    new = values + np.linalg.solve(hessian, rhs)
    if surface.name != "offset":
        # a multiplicative term stays positive
        new = np.maximum(new, 1e-3 * np.abs(new).max())
    surface.values = new.reshape(surface.grid.shape)

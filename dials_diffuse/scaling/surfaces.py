"""mdx2's smooth scaling terms, as options of the merge (issue 14).

With them the model of an observation (image i, voxel v) is

    S ~ W a(x, y, phi) d(x, y) (b_i a_i(|q_v|) I_v + c_i + c(|s_v|, phi_i))

* a(x, y, phi): an absorption surface over the detector plane and the
  rotation angle (x, y where the voxel's mean scattering vector meets the
  detector plane, in mm, written by the extraction; phi the angle at the image's centre);
* d(x, y): a detector response over the detector plane, shared by every
  image and sweep;
* c(|s|, phi): an additive offset smooth in resolution and angle, kept >= 0.

Each is the multilinear interpolation of control values on a regular grid
(:class:`dials_diffuse.surface_model.ControlGrid`), regularised as mdx2 does
(second differences along each axis, and the thin-plate cross term in the
detector plane, weighted relative to the data by ``smoothness*``). Each
iteration of the refinement takes one Gauss-Newton step per term on the
joint least squares in (term, I) with the intensities eliminated (Schur
complement): alternating between a surface and the intensities converges
about ten times slower, because a voxel is seen at a few nearby detector
positions, where a change of the surface is nearly a change of the voxel.
The current gain and offset of every row live in shared columns of the
observations (``surface_gain``, ``surface_offset``) that every pass reads
through :func:`dials_diffuse.scaling.passes.observation_chunk`, so the
merge, the scales, the rejection and the error model all see the whole
model.

The free factors are fixed so that each term means one thing:

* d has mean 1 over its control values (the overall level is the map's);
* a has mean 1 over x, y at each phi (a change with phi alone is the
  scale b's); with d refined too, a also has mean 1 over phi at each x, y
  (what does not change with phi is d's);
* a gain that depends on |s| alone cannot be told from the map's isotropic
  scattering (I_v / h(|s_v|) with g h(|s|) predicts the same data), so the
  gain applied is a d / h(|s|), with h(|s|) the mean of a d over the
  observations at each |s|: the map keeps its radial profile;
* c >= 0, pulled lightly towards 0 where the data do not fix it (mdx2's
  alpha_min): an offset the same on every image is nearly the map's
  isotropic part.

Without rotation (stills) a(x, y) and d(x, y) are one and the same, and
c(|s|) is the map's isotropic part: those combinations are refused.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from dials.util import Sorry

from dials_diffuse.observations import shared_array
from dials_diffuse.surface_model import ControlGrid, points_spanning

logger = logging.getLogger("dials.diffuse_merge")


#: PHIL of scaling.surfaces (included by phil_scopes.merge_phil_str)
surfaces_phil_str = """
surfaces
  .help = "mdx2's smooth scaling terms (Meisburger & Ando): S ~ W a(x, y, phi) "
          "d(x, y) (b I + c(|s|, phi)). Each is multilinear on a grid of control "
          "values and regularised as mdx2 does (second differences along each "
          "axis and the thin-plate cross term in x, y; smoothness relative to "
          "the data). x, y: where the voxel's mean scattering vector meets the "
          "detector plane (mm); phi: the rotation angle at the image's centre."
{
  absorption
    .help = "An absorption surface a(x, y, phi), mean 1 over x, y at each phi."
  {
    enable = False
      .type = bool
    n_x = 5
      .type = int(value_min=2)
    n_y = 5
      .type = int(value_min=2)
    phi_interval = 10.0
      .type = float(value_min=0)
      .help = "Degrees between control values in phi (0: a(x, y), no phi)."
    smoothness_xy = 10.0
      .type = float(value_min=0)
      .help = "Weight of the roughness in x, y (as mdx2's alpha_xy: relative to "
              "the data, strong by default; a(x, y, phi) can otherwise mimic the "
              "map's anisotropy where few voxels are seen twice)."
    smoothness_phi = 1.0
      .type = float(value_min=0)
      .help = "Weight of the roughness in phi (mdx2's alpha_z)."
  }
  response
    .help = "A detector response d(x, y) shared by all images, mean 1."
  {
    enable = False
      .type = bool
    n_x = 9
      .type = int(value_min=2)
    n_y = 9
      .type = int(value_min=2)
    smoothness = 1.0
      .type = float(value_min=0)
      .help = "Weight of the roughness in x, y (mdx2's alpha)."
  }
  offset
    .help = "An additive offset c(|s|, phi) >= 0 (rotation data), pulled lightly "
            "towards 0 where the data do not fix it (mdx2's alpha_min)."
  {
    enable = False
      .type = bool
    n_s = 8
      .type = int(value_min=2)
    phi_interval = 10.0
      .type = float(value_min=0)
    smoothness_s = 1.0
      .type = float(value_min=0)
      .help = "Weight of the roughness in |s| (mdx2's alpha_x)."
    smoothness_phi = 1.0
      .type = float(value_min=0)
      .help = "Weight of the roughness in phi (mdx2's alpha_y)."
  }
}
"""


@dataclasses.dataclass
class Surface:
    """One smooth term: its control grid, values and coordinate names."""

    name: str  # absorption, response or offset
    grid: ControlGrid
    values: np.ndarray  # control values, grid.shape
    coordinates: tuple  # names of the grid's axes: x, y (mm), phi (deg), s (1/Angstrom)
    smoothness: tuple  # weight of the roughness along each axis, relative to the data

    def penalty(self, normal) -> np.ndarray:
        """The roughness penalty matrix: along each axis a, weight_a times
        trace(normal) / trace(D_a^T D_a) times D_a^T D_a (mdx2's scaling of
        its alphas, so that a weight means the same on any grid and data)."""
        total = np.zeros((self.grid.size, self.grid.size))
        data = float(np.trace(normal))
        for weight, rough in zip(self.smoothness, self.grid.roughness_by_axis()):
            trace = float(np.trace(rough))
            if weight > 0 and trace > 0:
                total += weight * data / trace * rough
        if self.coordinates[:2] == ("x", "y"):
            # the detector plane's thin-plate cross term 2 f_xy^2, weighted
            # like the second differences along x
            along_x = self.grid.roughness_by_axis()[0]
            mixed = self.grid.mixed_roughness(0, 1)
            if self.smoothness[0] > 0 and np.trace(along_x) > 0:
                total += 2.0 * self.smoothness[0] * data / np.trace(along_x) * mixed
        return total

    def row_coordinates(self, obs, rows) -> np.ndarray:
        """(n, d) coordinates of the observation rows ``rows`` (a slice)."""
        columns = []
        for name in self.coordinates:
            if name == "x":
                columns.append(obs.detector_x[rows])
            elif name == "y":
                columns.append(obs.detector_y[rows])
            elif name == "phi":
                columns.append(obs.image_phi[obs.image[rows]])
            else:  # s
                columns.append(obs.voxel_qmag[obs.voxel[rows]])
        return np.stack([np.asarray(c, np.float64) for c in columns], axis=1)

    def evaluate(self, coordinates) -> np.ndarray:
        return self.grid.evaluate(self.values, coordinates)

    def as_dict(self) -> dict:
        return {
            "coordinates": list(self.coordinates),
            "lower": self.grid.lower.tolist(),
            "upper": self.grid.upper.tolist(),
            "shape": list(self.grid.shape),
            "smoothness": list(self.smoothness),
            "control_values": self.values.tolist(),
        }


@dataclasses.dataclass
class SurfaceModel:
    """The enabled terms (None: off), and the radial factor h(|s|) of a d."""

    absorption: Optional[Surface] = None
    response: Optional[Surface] = None
    offset: Optional[Surface] = None
    radial: Optional[Surface] = None

    def terms(self):
        return [s for s in (self.absorption, self.response, self.offset) if s is not None]

    @property
    def n_parameters(self) -> int:
        return sum(s.grid.size for s in self.terms())

    def product(self, obs, rows):
        """a d of the rows, from their columns (1 where neither is on)."""
        gain = 1.0
        for column in obs.surface_terms.values():
            gain = gain * column[rows]
        return gain

    def normalise(self, name):
        """Fix the free factors of one term (see the module docstring)."""
        a = self.absorption
        if name == "absorption":
            phi_axis = a.coordinates.index("phi") if "phi" in a.coordinates else None
            xy_axes = tuple(k for k, c in enumerate(a.coordinates) if c in ("x", "y"))
            for _ in range(3):
                if phi_axis is not None and self.response is not None:
                    a.values = a.values / a.values.mean(axis=phi_axis, keepdims=True)
                a.values = a.values / a.values.mean(axis=xy_axes, keepdims=True)
        if name == "response":
            self.response.values = self.response.values / self.response.values.mean()
        if name == "offset":
            self.offset.values = np.maximum(self.offset.values, 0.0)

    def as_dict(self) -> dict:
        doc = {
            "model": "S ~ W a(x, y, phi) d(x, y) (b a_i(|q|) I + c_i + c(|s|, phi)); each "
                     "term multilinear in its control values on a regular grid from lower "
                     "to upper (control_values indexed in the order of coordinates)",
            "coordinates": "x, y: where the voxel's mean scattering vector meets the "
                           "detector plane (mm along panel 0's fast and slow axes from "
                           "its origin); phi: rotation angle at the image's "
                           "centre (deg); s: |s| of the voxel centre (1/Angstrom)",
            "normalisation": "d mean 1; a mean 1 over x, y at each phi (and over phi at "
                             "each x, y when d is refined); gain applied a d / h(|s|); "
                             "c >= 0",
        }
        for s in self.terms():
            doc[s.name] = s.as_dict()
        if self.radial is not None:
            doc["radial"] = self.radial.as_dict()
            doc["radial"]["meaning"] = (
                "h(|s|): the weighted mean of a d over the observations at each |s|; the "
                "gain applied is a d / h(|s|), because a gain that depends on |s| alone "
                "cannot be told from the map's isotropic scattering")
        return doc


def enabled(params) -> bool:
    """Whether any of scaling.surfaces is on."""
    return bool(params.absorption.enable or params.response.enable or params.offset.enable)


def needs_detector_xy(params) -> bool:
    return bool(params.absorption.enable or params.response.enable)


def setup_surfaces(scaling_params, obs, image_phi) -> Optional[SurfaceModel]:
    """The SurfaceModel of scaling.surfaces for these observations (None when
    all are off), with the shared per-row columns allocated on ``obs``.
    ``image_phi``: the rotation angle (deg) at each image's centre, None for
    stills. Call before the passes' workers are forked."""
    p = scaling_params.surfaces
    if not enabled(p):
        return None
    use_phi = image_phi is not None
    if p.offset.enable:
        if not use_phi:
            raise Sorry("scaling.surfaces.offset needs rotation data: without phi an "
                        "offset c(|s|) is the isotropic part of the map")
        if scaling_params.offsets:
            raise Sorry("scaling.offsets and scaling.surfaces.offset both refine an additive "
                        "offset: choose one")
    absorption_phi = use_phi and p.absorption.phi_interval > 0
    if p.absorption.enable and p.response.enable and not absorption_phi:
        raise Sorry("scaling.surfaces.absorption without phi (stills, or phi_interval=0) and "
                    "scaling.surfaces.response are the same surface: enable one of them")
    if needs_detector_xy(p) and obs.detector_x is None:
        raise Sorry("scaling.surfaces: the observations have no detector positions")
    if use_phi:
        obs.image_phi = np.asarray(image_phi, np.float64)
    model = SurfaceModel()
    xy = None
    if needs_detector_xy(p):
        xy = [(float(np.min(c)), float(np.max(c))) for c in (obs.detector_x, obs.detector_y)]
    if p.absorption.enable:
        names = ("x", "y") + (("phi",) if absorption_phi else ())
        shape = (p.absorption.n_x, p.absorption.n_y) + (
            (_phi_points(obs.image_phi, p.absorption.phi_interval),) if absorption_phi else ())
        smoothness = (p.absorption.smoothness_xy,) * 2 + (
            (p.absorption.smoothness_phi,) if absorption_phi else ())
        model.absorption = _surface("absorption", names, shape, xy, obs, 1.0, smoothness)
    if p.response.enable:
        model.response = _surface("response", ("x", "y"), (p.response.n_x, p.response.n_y),
                                  xy, obs, 1.0, (p.response.smoothness,) * 2)
        _require_separable(obs, model.response, "response")
    if p.absorption.enable and not absorption_phi:
        _require_separable(obs, model.absorption, "absorption")
    if p.offset.enable:
        shape = (p.offset.n_s, _phi_points(obs.image_phi, p.offset.phi_interval))
        model.offset = _surface("offset", ("s", "phi"), shape, xy, obs, 0.0,
                                (p.offset.smoothness_s, p.offset.smoothness_phi))
    if needs_detector_xy(p):
        model.radial = _surface("radial", ("s",), (RADIAL_POINTS,), xy, obs, 1.0,
                                (RADIAL_SMOOTHNESS,))
    # the per-row columns every pass reads (shared with the forked workers):
    # the gain a d / h and offset c the model applies, and a and d each
    if needs_detector_xy(p):
        obs.surface_gain = _ones(obs.n_obs)
        obs.surface_terms = {s.name: _ones(obs.n_obs)
                             for s in (model.absorption, model.response) if s is not None}
    if model.offset is not None:
        obs.surface_offset = shared_array(obs.n_obs, np.float32)
    logger.info("Scaling surfaces: %s", ", ".join(
        f"{s.name}({', '.join(s.coordinates)}) on a {' x '.join(map(str, s.grid.shape))} grid"
        for s in model.terms()))
    return model


#: control points and smoothness of the radial factor h(|s|) (a fit of a d,
#: not of the data: fine and lightly smoothed)
RADIAL_POINTS = 16
RADIAL_SMOOTHNESS = 1e-3


def _ones(n):
    column = shared_array(n, np.float32)
    column[:] = 1.0
    return column


def _phi_points(image_phi, interval):
    return points_spanning(float(np.max(image_phi) - np.min(image_phi)), interval)


#: the least fraction of observations whose voxel is also seen at least one
#: control-grid cell away on the detector, for a surface over (x, y) alone
MIN_SEPARABLE_FRACTION = 0.2


def separable_fraction(obs, surface) -> float:
    """The fraction of observations whose voxel (its symmetry mates merged)
    is seen at detector positions at least one control-grid cell apart along
    x or y. Only such voxels tell a gain over (x, y) from the intensities: a
    crystal in one orientation (stills of one setting) sees each voxel at one
    place, where d(x, y) is the map over again."""
    x, y = obs.detector_x, obs.detector_y
    g = surface.grid
    cell = ((g.upper - g.lower) / (np.asarray(g.shape) - 1))[:2]  # x, y come first
    # per-voxel extent of the positions, after one sort by voxel
    order = np.argsort(obs.voxel, kind="stable")
    voxel = obs.voxel[order]
    starts = np.flatnonzero(np.r_[True, voxel[1:] != voxel[:-1]])
    spread = np.zeros(starts.size, bool)
    for values, width in ((x, cell[0]), (y, cell[1])):
        v = np.asarray(values, np.float64)[order]
        extent = np.maximum.reduceat(v, starts) - np.minimum.reduceat(v, starts)
        spread |= extent >= width
    counts = np.diff(np.r_[starts, voxel.size])
    return float(counts[spread].sum() / max(voxel.size, 1))


def _require_separable(obs, surface, name):
    fraction = separable_fraction(obs, surface)
    logger.info("Scaling surfaces: %.1f %% of the observations are of voxels seen at two "
                "detector positions a control cell apart", 100 * fraction)
    if fraction < MIN_SEPARABLE_FRACTION:
        raise Sorry(
            f"scaling.surfaces.{name}: only {100 * fraction:.1f} % of the observations are of "
            "voxels seen at two detector positions a control cell apart (at least "
            f"{100 * MIN_SEPARABLE_FRACTION:.0f} % needed): the {name} over the detector cannot "
            "be told from the intensities here (one crystal orientation?). Merge without it, "
            "or add data from other orientations")


def _surface(name, coordinates, shape, xy, obs, start, smoothness):
    ranges = []
    for c in coordinates:
        if c == "x":
            ranges.append(xy[0])
        elif c == "y":
            ranges.append(xy[1])
        elif c == "phi":
            ranges.append((float(obs.image_phi.min()), float(obs.image_phi.max())))
        else:
            ranges.append((float(obs.voxel_qmag.min()), float(obs.voxel_qmag.max())))
    grid = ControlGrid.spanning([r[0] for r in ranges], [r[1] for r in ranges], shape)
    return Surface(name, grid, np.full(grid.shape, float(start)), tuple(coordinates),
                   tuple(float(w) for w in smoothness))

"""The exact truth of a simulated dataset and everything derived from it.

``Truth`` is both what the simulator uses to make the images and what
``load_truth(directory)`` returns, so the expected counts of a pixel computed by
a test are the very numbers the images were drawn from.

Per-panel pixel arrays have shape (n_slow, n_fast) (as ``get_raw_data``).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import List

import numpy as np
from scipy.special import ndtr
from scitbx import matrix

from dials_diffuse import corrections as corr
from dials_diffuse import geometry as geo
from dials_diffuse.simulate.diffuse_model import DiffuseModel, DiffuseParameters

TRUTH_JSON = "truth.json"
TRUTH_EXPT = "truth.expt"
BRAGG_REFL = "bragg.refl"


class Truth:
    """Truth of a simulated dataset (see docs/SIMULATOR.md)."""

    def __init__(self, data: dict, experiments, directory=None, bragg=None):
        self.data = data
        self.experiments = experiments
        self.directory = pathlib.Path(directory) if directory is not None else None
        self.model = DiffuseModel(DiffuseParameters(**data["diffuse"]))
        self.n_images = int(data["n_images"])
        self.scales = np.array(
            [data["scales"][str(i)] for i in range(self.n_images)], dtype=float
        )
        self._bragg = bragg

    # -- plain parameters ------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.data["mode"]

    @property
    def is_stills(self) -> bool:
        return self.mode == "stills"

    @property
    def flux(self) -> float:
        return float(self.data["flux"])

    @property
    def gain(self) -> float:
        return float(self.data["gain"])

    @property
    def exposure_time(self) -> float:
        return float(self.data["exposure_time"])

    @property
    def hot_pixels(self) -> np.ndarray:
        """(k, 3) int array of (panel, slow, fast)."""
        return np.array(self.data["hot_pixels"]["pixels"], dtype=int).reshape(-1, 3)

    @property
    def dead_pixels(self) -> np.ndarray:
        return np.array(self.data["dead_pixels"]["pixels"], dtype=int).reshape(-1, 3)

    @property
    def beamstop(self) -> dict:
        return self.data["beamstop"]

    @property
    def detector(self):
        return self.experiments[0].detector

    @property
    def beam(self):
        return self.experiments[0].beam

    def image_path(self, i: int) -> pathlib.Path:
        return self.directory / self.data["images"][i]

    # -- diffuse model -----------------------------------------------------------
    def diffuse(self, hkl) -> np.ndarray:
        """D(h, k, l) at fractional Miller indices, (n, 3) -> (n,)."""
        return self.model.diffuse(hkl)

    def diffuse_voxel_average(self, hkl_centres, ndiv, n_sub: int = 5) -> np.ndarray:
        """D averaged over voxels of size 1/ndiv per axis (n_sub^3 sub-samples)."""
        return self.model.voxel_average(hkl_centres, ndiv, n_sub=n_sub)

    # -- per-image geometry ------------------------------------------------------
    def experiment_and_index(self, i: int):
        """(experiment, index of image i in that experiment's imageset)."""
        if self.is_stills:
            return self.experiments[i], 0
        return self.experiments[0], i

    def setting_matrix(self, i: int) -> np.ndarray:
        """M with q = M hkl at the centre of image i (0-based)."""
        expt, index = self.experiment_and_index(i)
        return geo.setting_matrix(expt, None if self.is_stills else index)

    def setting_matrices(self, i: int) -> List[np.ndarray]:
        """The matrices whose D is averaged for image i (rotation.phi_subsamples)."""
        centre = self.setting_matrix(i)
        n = int(self.data.get("rotation", {}).get("phi_subsamples", 1) or 1)
        if self.is_stills or n <= 1:
            return [centre]
        expt, _ = self.experiment_and_index(i)
        gonio = expt.goniometer
        osc = expt.scan.get_oscillation(deg=False)[1]
        axis = matrix.col(gonio.get_rotation_axis_datum())
        S = matrix.sqr(gonio.get_setting_rotation())
        out = []
        for k in range(n):
            delta = ((k + 0.5) / n - 0.5) * osc
            R = axis.axis_and_angle_as_r3_rotation_matrix(delta, deg=False)
            T = np.array(S * R * S.inverse()).reshape(3, 3)
            out.append(T @ centre)
        return out

    @functools.cached_property
    def geometry(self) -> List[geo.PanelGeometry]:
        return geo.detector_geometry(self.detector)

    @functools.cached_property
    def q_lab(self) -> List[np.ndarray]:
        s0 = self.beam.get_s0()
        return [geo.scattering_vectors(g.unit_s1, s0) for g in self.geometry]

    def _shape(self, panel_id):
        return self.geometry[panel_id].image_shape

    def hkl(self, i: int) -> List[np.ndarray]:
        """Per panel (n_slow, n_fast, 3) fractional hkl at the centre of image i."""
        M = self.setting_matrix(i)
        return [
            geo.miller_indices(q, M).reshape(self._shape(p) + (3,))
            for p, q in enumerate(self.q_lab)
        ]

    # -- detector response -------------------------------------------------------
    @functools.cached_property
    def corrections(self) -> List[corr.CorrectionFactors]:
        """The factors that were applied (switched-off ones are 1), flat per panel."""
        c = self.data["corrections"]
        return [
            corr.correction_factors(
                g,
                self.beam,
                self.detector[g.panel_id],
                polarization=c["polarization"],
                solid_angle_on=c["solid_angle"],
                efficiency=c["efficiency"],
                air=c["air"],
                air_temperature_k=c["air_temperature"],
                air_pressure_atm=c["air_pressure"],
            )
            for g in self.geometry
        ]

    def correction_total(self) -> List[np.ndarray]:
        """P * Omega * eta * T_air as applied, per panel (n_slow, n_fast)."""
        return [
            c.total.reshape(self._shape(p)) for p, c in enumerate(self.corrections)
        ]

    def background_photons(self) -> List[np.ndarray]:
        """Background photons per pixel per image (the same on every image)."""
        return [b.copy() for b in self._background]

    @functools.cached_property
    def _background(self):
        b = self.data["background"]
        out = []
        for p, q in enumerate(self.q_lab):
            qn = np.sqrt(np.einsum("ij,ij->i", q, q))
            bg = b["constant"] + b["radial_amplitude"] * np.exp(
                -0.5 * (qn / b["radial_width"]) ** 2
            )
            out.append(bg.reshape(self._shape(p)))
        return out

    def shadow(self) -> List[np.ndarray]:
        """True inside the beamstop shadow (distance from the beam axis < radius)."""
        return [s.copy() for s in self._shadow]

    @functools.cached_property
    def _shadow(self):
        radius = float(self.beamstop["radius_mm"])
        s0 = np.array(self.beam.get_s0())
        axis = s0 / np.linalg.norm(s0)
        out = []
        for g in self.geometry:
            along = g.lab_mm @ axis
            perp2 = np.einsum("ij,ij->i", g.lab_mm, g.lab_mm) - along**2
            out.append(
                ((perp2 < radius * radius) & (along > 0)).reshape(g.image_shape)
            )
        return out

    def gaps(self) -> List[np.ndarray]:
        """True on pixels dxtbx masks statically (Pilatus module gaps), written as -1."""
        out = []
        for p, panel in enumerate(self.detector):
            m = np.zeros(self._shape(p), dtype=bool)
            for f0, s0, f1, s1 in panel.get_mask():
                m[s0:s1, f0:f1] = True
            out.append(m)
        return out

    def bad_pixels(self) -> List[np.ndarray]:
        """True on hot and dead pixels."""
        out = [np.zeros(self._shape(p), dtype=bool) for p in range(len(self.detector))]
        for p, s, f in np.concatenate([self.hot_pixels, self.dead_pixels]):
            out[p][s, f] = True
        return out

    def pixel_mask(self) -> List[np.ndarray]:
        """True = usable for diffuse: not a gap, hot, dead or beamstop-shadowed pixel.

        Bragg peaks are not excluded here (mask them from the predictions).
        """
        return [
            ~(g | b | s) for g, b, s in zip(self.gaps(), self.bad_pixels(), self.shadow())
        ]

    # -- expected signal ---------------------------------------------------------
    def expected_diffuse_photons(self, i: int) -> List[np.ndarray]:
        """scale_i * D * P * Omega * eta * T_air * exposure * flux, per panel."""
        factor = self.scales[i] * self.exposure_time * self.flux
        matrices = self.setting_matrices(i)
        out = []
        for p, (q, c) in enumerate(zip(self.q_lab, self.corrections)):
            d = np.zeros(len(q))
            for M in matrices:
                d += self.diffuse(geo.miller_indices(q, M))
            d /= len(matrices)
            out.append((factor * d * c.total).reshape(self._shape(p)))
        return out

    @property
    def bragg(self):
        """The Bragg spot table (dials reflection table) or None."""
        if self._bragg is None and self.directory is not None:
            path = self.directory / BRAGG_REFL
            if path.exists():
                from dials.array_family import flex

                self._bragg = flex.reflection_table.from_file(str(path))
        return self._bragg

    def bragg_spots(self, i: int):
        """(panel, x_px, y_px, counts) of the Bragg spots recorded on image i."""
        table = self.bragg
        empty = (np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros(0))
        if table is None or len(table) == 0:
            return empty
        xyz = table["xyzcal.px"].as_numpy_array()
        panel = table["panel"].as_numpy_array().astype(int)
        photons = table["photons_full"].as_numpy_array()
        if self.is_stills:
            sel = table["id"].as_numpy_array() == i
            frac = np.ones(int(sel.sum()))
        else:
            sigma = float(self.data["bragg"]["mosaicity_deg"]) / float(
                self.data["rotation"]["oscillation"]
            )
            z = xyz[:, 2]
            sel = np.abs(z - (i + 0.5)) < 6 * sigma + 1
            zs = z[sel]
            frac = ndtr((i + 1 - zs) / sigma) - ndtr((i - zs) / sigma)
        return (
            panel[sel],
            xyz[sel, 0],
            xyz[sel, 1],
            photons[sel] * frac * self.scales[i] / self.gain,
        )

    def expected_bragg_counts(self, i: int) -> List[np.ndarray]:
        """Bragg counts expected on image i (before the beamstop shadow)."""
        out = [np.zeros(self._shape(p)) for p in range(len(self.detector))]
        panel, x, y, counts = self.bragg_spots(i)
        sigma = float(self.data["bragg"]["sigma_px"])
        render_gaussians(out, panel, x, y, counts, sigma)
        return out

    def expected_counts(self, i: int) -> List[np.ndarray]:
        """Mean of the Poisson draw of every pixel of image i, in counts.

        (diffuse + background [+ Bragg]) photons, times the beamstop transmission
        in the shadow, divided by the gain. Gap, hot and dead pixels are overwritten
        in the written images (-1, hot value, 0) and not reflected here.
        """
        transmission = float(self.beamstop["transmission"])
        out = []
        bragg = self.expected_bragg_counts(i)
        for diffuse, bg, shadow, b in zip(
            self.expected_diffuse_photons(i),
            self._background,
            self._shadow,
            bragg,
        ):
            mu = (diffuse + bg) / self.gain + b
            mu[shadow] *= transmission
            out.append(mu)
        return out

    def raw_data(self, i: int):
        """The written image i through dxtbx: tuple of (n_slow, n_fast) int arrays."""
        expt, index = self.experiment_and_index(i)
        return tuple(d.as_numpy_array() for d in expt.imageset.get_raw_data(index))


def render_gaussians(images, panel, x, y, total, sigma, n_sigma=4.0):
    """Add pixel-integrated 2-D Gaussians (centre x, y in pixels) to per-panel images."""
    if len(panel) == 0:
        return
    half = int(np.ceil(n_sigma * sigma)) + 1
    offsets = np.arange(-half, half + 1)
    ix = np.floor(x).astype(int)[:, None] + offsets[None, :]  # (n, w)
    iy = np.floor(y).astype(int)[:, None] + offsets[None, :]
    wx = ndtr((ix + 1 - x[:, None]) / sigma) - ndtr((ix - x[:, None]) / sigma)
    wy = ndtr((iy + 1 - y[:, None]) / sigma) - ndtr((iy - y[:, None]) / sigma)
    w = wy[:, :, None] * wx[:, None, :] * total[:, None, None]  # (n, wy, wx)
    for p, image in enumerate(images):
        sel = panel == p
        if not sel.any():
            continue
        n_slow, n_fast = image.shape
        yy = np.broadcast_to(iy[sel][:, :, None], w[sel].shape)
        xx = np.broadcast_to(ix[sel][:, None, :], w[sel].shape)
        ok = (xx >= 0) & (xx < n_fast) & (yy >= 0) & (yy < n_slow)
        flat = yy[ok] * n_fast + xx[ok]
        image += np.bincount(flat, weights=w[sel][ok], minlength=image.size).reshape(
            image.shape
        )


def load_truth(directory) -> Truth:
    """Load the truth of a dataset written by dials.diffuse_simulate."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = pathlib.Path(directory)
    with open(directory / TRUTH_JSON) as fh:
        data = json.load(fh)
    experiments = ExperimentListFactory.from_json_file(
        str(directory / TRUTH_EXPT), check_format=True
    )
    return Truth(data, experiments, directory)

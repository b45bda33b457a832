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

from dials_diffuse.simulate import reference_physics as ref
from dials_diffuse.simulate import surfaces
from dials_diffuse.simulate.diffuse_model import DiffuseModel, DiffuseParameters
from dials_diffuse.simulate.absolute import (
    AbsoluteDiffuseModel,
    compton_energy_ratio,
    incoherent_per_cell,
    parse_elements,
    shifted_response,
)

TRUTH_JSON = "truth.json"
TRUTH_EXPT = "truth.expt"
BRAGG_REFL = "bragg.refl"


class Truth:
    """Truth of a simulated dataset (see docs/SIMULATOR.md)."""

    def __init__(self, data: dict, experiments, directory=None, bragg=None):
        self.data = data
        self.experiments = experiments
        self.directory = pathlib.Path(directory) if directory is not None else None
        absolute = data.get("absolute")
        if absolute:
            self.elements = parse_elements(absolute["composition"])
            self.model = AbsoluteDiffuseModel(DiffuseParameters(**data["diffuse"]),
                                              self.elements, absolute["contrast"])
        else:
            self.elements = None
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

    def diffuse_voxel_average(
        self, hkl_centres, ndiv, n_sub: int = 5, extrapolate: bool = True
    ) -> np.ndarray:
        """D averaged over voxels of size 1/ndiv per axis: n_sub^3 midpoint rule,
        Richardson-extrapolated with the (n_sub - 2)^3 rule (see DiffuseModel)."""
        return self.model.voxel_average(
            hkl_centres, ndiv, n_sub=n_sub, extrapolate=extrapolate
        )

    # -- per-image geometry ------------------------------------------------------
    def experiment_and_index(self, i: int):
        """(experiment, index of image i in that experiment's imageset)."""
        if self.is_stills:
            return self.experiments[i], 0
        return self.experiments[0], i

    @property
    def first_frame(self) -> int:
        """Absolute array index of image 0 (scan.get_array_range()[0]; 0 for stills)."""
        if self.is_stills:
            return 0
        return int(self.experiments[0].scan.get_array_range()[0])

    def frame(self, i: int) -> int:
        """Absolute array index (DIALS frame number, 0-based) of image i."""
        return self.first_frame + i

    def _rotation_image(self, i: int) -> ref.RotationImage:
        return ref.rotation_image(self.experiments[0], self.frame(i))

    def _phi_offsets(self) -> np.ndarray:
        """Angles (rad) about the image centre at which D is averaged."""
        n = int(self.data.get("rotation", {}).get("phi_subsamples", 1) or 1)
        if self.is_stills or n <= 1:
            return np.zeros(1)
        width = self.experiments[0].scan.get_oscillation(deg=False)[1]
        return ((np.arange(n) + 0.5) / n - 0.5) * width

    def setting_matrix(self, i: int) -> np.ndarray:
        """M with q = M hkl at the centre of image i (0-based)."""
        if self.is_stills:
            return np.array(self.experiments[i].crystal.get_A(), dtype=float).reshape(3, 3)
        return self._rotation_image(i).setting_matrix()

    def setting_matrices(self, i: int) -> List[np.ndarray]:
        """The matrices whose D is averaged for image i (rotation.phi_subsamples)."""
        if self.is_stills:
            return [self.setting_matrix(i)]
        rot = self._rotation_image(i)
        return [rot.setting_matrix(d) for d in self._phi_offsets()]

    @functools.cached_property
    def geometry(self) -> List[ref.ReferencePanel]:
        """Pixel-centre lab positions of every panel (dxtbx px -> mm -> lab)."""
        return ref.reference_panels(self.detector)

    @functools.cached_property
    def q_lab(self) -> List[np.ndarray]:
        s0 = self.beam.get_s0()
        return [ref.q_vectors(g.unit_s1, s0) for g in self.geometry]

    def _shape(self, panel_id):
        return self.geometry[panel_id].image_shape

    def _hkl_flat(self, i: int, dphi: float = 0.0) -> List[np.ndarray]:
        if self.is_stills:
            A = self.experiments[i].crystal.get_A()
            return [ref.stills_hkl(q, A) for q in self.q_lab]
        rot = self._rotation_image(i)
        return [rot.hkl(q, dphi) for q in self.q_lab]

    def hkl(self, i: int) -> List[np.ndarray]:
        """Per panel (n_slow, n_fast, 3) fractional hkl at the centre of image i."""
        return [
            h.reshape(self._shape(p) + (3,)) for p, h in enumerate(self._hkl_flat(i))
        ]

    # -- detector response -------------------------------------------------------
    @functools.cached_property
    def corrections(self) -> List[ref.Factors]:
        """The factors that were applied (switched-off ones are 1), flat per panel."""
        c = self.data["corrections"]
        return [
            ref.panel_factors(
                self.beam,
                self.detector,
                g,
                polarization_on=c["polarization"],
                solid_angle_on=c["solid_angle"],
                efficiency_on=c["efficiency"],
                air_on=c["air"],
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
        offsets = self._phi_offsets()
        d = [np.zeros(len(q)) for q in self.q_lab]
        for dphi in offsets:
            for p, h in enumerate(self._hkl_flat(i, dphi)):
                d[p] += self.diffuse(h)
        photons = [
            (factor * dp / len(offsets) * c.total).reshape(self._shape(p))
            for p, (dp, c) in enumerate(zip(d, self.corrections))
        ]
        if self.elements:
            for p, (q, c) in enumerate(zip(self.q_lab, self.corrections)):
                photons[p] += factor * self._compton_pixels(q, c).reshape(self._shape(p))
        for p in range(len(photons)):
            photons[p] *= self.surface(i, p)
        return photons

    def phi_deg(self, i: int) -> float:
        """Rotation angle at the centre of image i (degrees; 0 for stills)."""
        if self.is_stills:
            return 0.0
        return float(self.experiments[0].scan.get_angle_from_array_index(self.frame(i) + 0.5))

    def surface(self, i: int, panel_id: int) -> np.ndarray:
        """a(x, y, phi) d(x, y) of image i's panel (simulate/surfaces.py), 2-D."""
        settings = self.data.get("surfaces") or {}
        shape = self._shape(panel_id)
        out = np.ones(int(np.prod(shape)))
        if settings.get("absorption"):
            out *= surfaces.absorption(shape, self.phi_deg(i), settings["absorption"],
                                       settings["absorption_period_deg"])
        if settings.get("response"):
            out *= surfaces.response(shape, settings["response"])
        return out.reshape(shape)

    def compton_per_cell(self, qmag, energy_ratio=None) -> np.ndarray:
        """The true incoherent scattering per cell at |s| (electron units,
        with the recoil factor (E'/E)^2 of photon counting), before the
        detector's response at the shifted energy."""
        if energy_ratio is None:
            energy_ratio = compton_energy_ratio(qmag, self.beam.get_wavelength())
        return incoherent_per_cell(qmag, self.elements) * energy_ratio ** 2

    def _compton_pixels(self, q, factors) -> np.ndarray:
        """Compton of each pixel, in D units times the pixel's factors at E'."""
        qmag = np.sqrt(np.einsum("ij,ij->i", q, q))
        ratio = compton_energy_ratio(qmag, self.beam.get_wavelength())
        eta, air = shifted_response(factors.efficiency, factors.air, ratio)
        return (self.compton_per_cell(qmag, ratio) * factors.polarization * factors.solid_angle
                * eta * air)

    @property
    def bragg(self):
        """The Bragg spot table (dials reflection table) or None."""
        if self._bragg is None and self.directory is not None:
            path = self.directory / BRAGG_REFL
            if path.exists():
                from dials.array_family import flex

                self._bragg = flex.reflection_table.from_file(str(path))
        return self._bragg

    def _bragg_spots(self, i: int):
        """(panel, x_px, y_px, counts, sigma_px) of the spots recorded on image i."""
        table = self.bragg
        if table is None or len(table) == 0:
            return (np.zeros(0, int),) + (np.zeros(0),) * 4
        xyz = table["xyzcal.px"].as_numpy_array()
        panel = table["panel"].as_numpy_array().astype(int)
        photons = table["photons_full"].as_numpy_array()
        if "sigma_px" in table:
            sigma_px = table["sigma_px"].as_numpy_array()
        else:
            sigma_px = np.full(len(table), float(self.data["bragg"]["sigma_px"]))
        if self.is_stills:
            sel = table["id"].as_numpy_array() == i
            frac = np.ones(int(sel.sum()))
        else:
            frac_all = rocking_fractions(self, table, i)
            sel = frac_all > 0
            frac = frac_all[sel]
        return (
            panel[sel],
            xyz[sel, 0],
            xyz[sel, 1],
            photons[sel] * frac * self.scales[i] / self.gain,
            sigma_px[sel],
        )

    def bragg_spots(self, i: int):
        """(panel, x_px, y_px, counts) of the Bragg spots recorded on image i.

        Rotation images: each spot's fraction of its rocking curve that falls in the
        image's phi range (Gaussian of sigma bragg.rocking_sigma_deg = mosaicity/|zeta|).
        """
        return self._bragg_spots(i)[:4]

    def expected_bragg_counts(self, i: int) -> List[np.ndarray]:
        """Bragg counts expected on image i (before the beamstop shadow)."""
        out = [np.zeros(self._shape(p)) for p in range(len(self.detector))]
        panel, x, y, counts, sigma = self._bragg_spots(i)
        render_gaussians(out, panel, x, y, counts, sigma)
        return out

    def expected_photons(self, i: int) -> List[np.ndarray]:
        """Mean detected photons of every pixel of image i (Poisson mean of the draw).

        diffuse + background + Bragg photons, times the beamstop transmission in the
        shadow. Gap, hot and dead pixels are overwritten in the written images (-1,
        hot value, 0) and not reflected here.
        """
        transmission = float(self.beamstop["transmission"])
        out = []
        for diffuse, bg, shadow, b in zip(
            self.expected_diffuse_photons(i),
            self._background,
            self._shadow,
            self.expected_bragg_counts(i),
        ):
            mu = diffuse + bg + b * self.gain
            mu[shadow] *= transmission
            out.append(mu)
        return out

    def expected_counts(self, i: int) -> List[np.ndarray]:
        """Mean counts of every pixel of image i: expected_photons(i) / gain."""
        return [mu / self.gain for mu in self.expected_photons(i)]

    def raw_data(self, i: int):
        """The written image i through dxtbx: tuple of (n_slow, n_fast) int arrays."""
        expt, index = self.experiment_and_index(i)
        return tuple(d.as_numpy_array() for d in expt.imageset.get_raw_data(index))


def rocking_fractions(truth, table, i: int, n_sigma: float = 6.0) -> np.ndarray:
    """Fraction of every spot's rocking curve recorded on rotation image i.

    Phi((phi_end - phi_c) / sigma) - Phi((phi_start - phi_c) / sigma) in angle,
    phi_c = xyzcal.mm z, sigma = rocking_sigma_deg; 0 beyond n_sigma.
    """
    start, width = truth.experiments[0].scan.get_oscillation(deg=False)
    begin = start + i * width
    end = begin + width
    phi_c = table["xyzcal.mm"].as_numpy_array()[:, 2]
    sigma = np.deg2rad(table["rocking_sigma_deg"].as_numpy_array())
    near = (phi_c + n_sigma * sigma > begin) & (phi_c - n_sigma * sigma < end)
    frac = np.zeros(len(phi_c))
    frac[near] = ndtr((end - phi_c[near]) / sigma[near]) - ndtr(
        (begin - phi_c[near]) / sigma[near]
    )
    return frac


def render_gaussians(images, panel, x, y, total, sigma, n_sigma=4.0):
    """Add pixel-integrated 2-D Gaussians (centre x, y in pixels) to per-panel images.

    ``sigma`` (pixels) is a number or one value per spot.
    """
    if len(panel) == 0:
        return
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), np.shape(x))[:, None]
    half = int(np.ceil(n_sigma * sigma.max())) + 1
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

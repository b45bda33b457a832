"""Validated experimental models of a simulation: beam, detector, crystals, scan.

Every problem with the user's parameters raises ``dials.util.Sorry`` with a one
line message that names the parameter.
"""

from __future__ import annotations

import math
import os

import numpy as np
from dxtbx.model import BeamFactory, Crystal, Detector
from dxtbx.model.experiment_list import ExperimentListFactory
from scitbx import matrix

from dials.util import Sorry

from dials_diffuse.simulate import writer

PILATUS_MODULE = (487, 195)  # fast, slow
PILATUS_GAP = (7, 17)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def crystal_symmetry(unit_cell, space_group):
    """(uctbx.unit_cell, sgtbx.space_group_info), or Sorry naming the parameter."""
    from cctbx import sgtbx, uctbx

    if space_group is None or not str(space_group).strip():
        raise Sorry("crystal.space_group: a space group symbol is required")
    try:
        sgi = sgtbx.space_group_info(str(space_group))
    except Exception:
        raise Sorry(f"crystal.space_group: unknown space group '{space_group}'") from None
    if unit_cell is None or len(unit_cell) != 6:
        raise Sorry("crystal.unit_cell: six numbers a b c alpha beta gamma are required")
    a, b, c, al, be, ga = (float(x) for x in unit_cell)
    if min(a, b, c) <= 0:
        raise Sorry(f"crystal.unit_cell: cell edges must be > 0 (got {a:g} {b:g} {c:g})")
    if not all(0 < x < 180 for x in (al, be, ga)):
        raise Sorry("crystal.unit_cell: cell angles must lie between 0 and 180 degrees")
    try:
        uc = uctbx.unit_cell((a, b, c, al, be, ga))
    except Exception:
        raise Sorry(
            "crystal.unit_cell: impossible cell (angles %g %g %g)" % (al, be, ga)
        ) from None
    if not (uc.volume() > 0 and math.isfinite(uc.volume())):
        raise Sorry("crystal.unit_cell: the cell has no volume")
    if not sgi.group().is_compatible_unit_cell(uc, 1e-3, 1e-2):
        raise Sorry(
            "crystal.unit_cell: %s is incompatible with space group %s"
            % (" ".join("%g" % x for x in unit_cell), sgi)
        )
    return uc, sgi


def validate(params):
    """Check every parameter that can be wrong; raise Sorry on the first problem."""
    p = params
    if p.n_images is None or p.n_images < 1:
        raise Sorry(f"n_images: must be a positive number of images (got {p.n_images})")
    if p.random_seed is None or p.random_seed < 0:
        raise Sorry("random_seed: must be a non-negative integer")
    crystal_symmetry(p.crystal.unit_cell, p.crystal.space_group)
    if p.beam.wavelength is None or not p.beam.wavelength > 0:
        raise Sorry("beam.wavelength: must be > 0 Angstrom")
    if not 0 <= p.beam.polarization_fraction <= 1:
        raise Sorry("beam.polarization_fraction: must lie in [0, 1]")
    normal = np.array(p.beam.polarization_normal, dtype=float)
    if np.linalg.norm(normal) == 0 or abs(normal[2]) > 1e-6 * np.linalg.norm(normal):
        raise Sorry(
            "beam.polarization_normal: must be a non-zero vector perpendicular to the beam (z)"
        )
    d = p.detector
    for name in ("distance", "pixel_size"):
        value = getattr(d, name)
        if value is None or not value > 0:
            raise Sorry(f"detector.{name}: must be > 0")
    if d.type == "single":
        if d.n_fast is None or d.n_slow is None or d.n_fast < 1 or d.n_slow < 1:
            raise Sorry("detector.n_fast, detector.n_slow: must be >= 1")
        if d.format == "pilatus" and not is_pilatus_size(d.n_fast, d.n_slow):
            raise Sorry(
                "detector.format: pilatus needs a size that tiles into 487x195 modules "
                "with 7/17 pixel gaps (e.g. 487x619, 2463x2527)"
            )
    else:
        m = d.multipanel
        for name in ("n_panels_fast", "n_panels_slow", "panel_n_fast", "panel_n_slow"):
            if getattr(m, name) is None or getattr(m, name) < 1:
                raise Sorry(f"detector.multipanel.{name}: must be >= 1")
        for name in ("gap_fast", "gap_slow"):
            if getattr(m, name) is None or getattr(m, name) < 0:
                raise Sorry(f"detector.multipanel.{name}: must be >= 0")
        if p.mode == "rotation":
            raise Sorry(
                "detector.type: multipanel images (full CBF) are written for mode=stills only"
            )
    if d.sensor.material != "none" and not d.sensor.thickness > 0:
        raise Sorry("detector.sensor.thickness: must be > 0 mm for a sensor material")
    if not d.overload > 0:
        raise Sorry("detector.overload: must be > 0")
    if p.mode == "rotation":
        if p.rotation.oscillation is None or not p.rotation.oscillation > 0:
            raise Sorry("rotation.oscillation: must be > 0 degrees")
        if p.rotation.phi_subsamples < 1:
            raise Sorry("rotation.phi_subsamples: must be >= 1")
        if p.rotation.first_image is None or p.rotation.first_image < 1:
            raise Sorry("rotation.first_image: must be >= 1")
    if not p.exposure_time > 0:
        raise Sorry("exposure_time: must be > 0 s")
    if not p.flux >= 0:
        raise Sorry("flux: must be >= 0")
    if not p.gain > 0:
        raise Sorry("gain: must be > 0 (photons per count)")
    if p.scale.spread < 0:
        raise Sorry("scale.spread: must be >= 0")
    df = p.diffuse
    for name, value in (
        ("diffuse.isotropic.width", df.isotropic.width),
        ("diffuse.halo.width", df.halo.width),
        ("diffuse.streak.length", df.streak.length),
        ("diffuse.streak.width", df.streak.width),
    ):
        if value is None or not value > 0:
            raise Sorry(f"{name}: must be > 0 (1/Angstrom)")
    for name, value in (
        ("diffuse.isotropic.amplitude", df.isotropic.amplitude),
        ("diffuse.halo.amplitude", df.halo.amplitude),
        ("diffuse.streak.amplitude", df.streak.amplitude),
        ("background.constant", p.background.constant),
        ("background.radial_amplitude", p.background.radial_amplitude),
        ("bragg.intensity", p.bragg.intensity),
        ("beamstop.radius", p.beamstop.radius),
    ):
        if value is None or value < 0:
            raise Sorry(f"{name}: must be >= 0")
    if not p.background.radial_width > 0:
        raise Sorry("background.radial_width: must be > 0")
    if not 0 <= p.beamstop.transmission <= 1:
        raise Sorry("beamstop.transmission: must lie in [0, 1]")
    if p.bragg.enabled:
        if not p.bragg.sigma_px > 0:
            raise Sorry("bragg.sigma_px: must be > 0")
        if not p.bragg.mosaicity_deg > 0:
            raise Sorry("bragg.mosaicity_deg: must be > 0")
        if p.bragg.divergence_deg is None or p.bragg.divergence_deg < 0:
            raise Sorry("bragg.divergence_deg: must be >= 0")
        if p.bragg.d_min is not None and not p.bragg.d_min > 0:
            raise Sorry("bragg.d_min: must be > 0")
    if p.hot_pixels.count < 0 or p.dead_pixels.count < 0:
        raise Sorry("hot_pixels.count, dead_pixels.count: must be >= 0")
    if not 0 < p.hot_pixels.value < p.detector.overload:
        raise Sorry("hot_pixels.value: must lie between 0 and detector.overload")
    c = p.corrections
    if not c.air_temperature > 0 or c.air_pressure < 0:
        raise Sorry("corrections.air_temperature, air_pressure: need T > 0 K, P >= 0 atm")
    if not p.output.directory:
        raise Sorry("output.directory: a directory name is required")
    if not p.output.prefix or os.sep in p.output.prefix:
        raise Sorry("output.prefix: a plain file name prefix is required")


def is_pilatus_size(n_fast: int, n_slow: int) -> bool:
    def tiles(n, module, gap):
        k, rem = divmod(n + gap, module + gap)
        return k >= 1 and rem == 0

    return tiles(n_fast, PILATUS_MODULE[0], PILATUS_GAP[0]) and tiles(
        n_slow, PILATUS_MODULE[1], PILATUS_GAP[1]
    )


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def make_beam(params):
    beam = BeamFactory.simple(float(params.beam.wavelength))
    normal = matrix.col(params.beam.polarization_normal).normalize()
    beam.set_polarization_normal(normal.elems)
    beam.set_polarization_fraction(float(params.beam.polarization_fraction))
    return beam


def random_rotations(rng, n):
    """n uniformly distributed rotation matrices (from random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1)[:, None]
    w, x, y, z = q.T
    return np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        axis=1,
    ).reshape(n, 3, 3)


def make_crystal(unit_cell, space_group_info, U: np.ndarray) -> Crystal:
    O = np.array(unit_cell.orthogonalization_matrix()).reshape(3, 3)
    crystal = Crystal(
        tuple(O[:, 0]), tuple(O[:, 1]), tuple(O[:, 2]), space_group_info.group()
    )
    crystal.set_U(tuple(np.asarray(U, dtype=float).ravel()))
    return crystal


def sensor_description(params):
    material = params.detector.sensor.material
    if material == "Si":
        return "Silicon", float(params.detector.sensor.thickness)
    if material == "CdTe":
        return "CdTe", float(params.detector.sensor.thickness)
    return "unknown", 0.0


def single_panel_header(params, pilatus, image_number=0, start=0.0, increment=0.0):
    d = params.detector
    if d.beam_centre is None:
        centre_mm = (d.n_fast * d.pixel_size / 2.0, d.n_slow * d.pixel_size / 2.0)
    else:
        centre_mm = tuple(d.beam_centre)
    sensor, thickness = sensor_description(params)
    return writer.minicbf_header(
        pilatus=pilatus,
        pixel_size_mm=d.pixel_size,
        sensor=sensor,
        thickness_mm=thickness,
        exposure=params.exposure_time,
        count_cutoff=d.overload,
        wavelength=params.beam.wavelength,
        distance_mm=d.distance,
        beam_centre_px=(centre_mm[0] / d.pixel_size, centre_mm[1] / d.pixel_size),
        start_deg=start,
        increment_deg=increment,
        polarization=params.beam.polarization_fraction,
        image_number=image_number,
    )


def use_pilatus_header(params) -> bool:
    d = params.detector
    if d.format == "pilatus":
        return True
    if d.format == "generic":
        return False
    return is_pilatus_size(d.n_fast, d.n_slow)


def intended_multipanel_detector(params, beam) -> Detector:
    d = params.detector
    m = d.multipanel
    px = float(d.pixel_size)
    width = (m.n_panels_fast * m.panel_n_fast + (m.n_panels_fast - 1) * m.gap_fast) * px
    height = (m.n_panels_slow * m.panel_n_slow + (m.n_panels_slow - 1) * m.gap_slow) * px
    det = Detector()
    root = det.hierarchy()
    root.set_local_frame((1, 0, 0), (0, -1, 0), (-width / 2, height / 2, -d.distance))
    for j in range(m.n_panels_slow):
        for i in range(m.n_panels_fast):
            p = root.add_panel()
            p.set_name("tile_%d_%d" % (j, i))
            p.set_type("SENSOR_PAD")
            p.set_image_size((m.panel_n_fast, m.panel_n_slow))
            p.set_pixel_size((px, px))
            p.set_trusted_range((-1, d.overload))
            p.set_local_frame(
                (1, 0, 0),
                (0, 1, 0),
                (i * (m.panel_n_fast + m.gap_fast) * px, j * (m.panel_n_slow + m.gap_slow) * px, 0),
            )
    return det


def set_sensor(detector, params):
    """Material, thickness and mu (cctbx tables, as dxtbx) on every panel."""
    from cctbx.eltbx import attenuation_coefficient

    material = params.detector.sensor.material
    if material == "none":
        return
    mu = (
        attenuation_coefficient.get_table(material).mu_at_angstrom(params.beam.wavelength)
        / 10.0
    )
    for panel in detector:
        panel.set_material(material)
        panel.set_thickness(float(params.detector.sensor.thickness))
        panel.set_mu(mu)


def read_back(path):
    """The ExperimentList dxtbx makes from one image file."""
    experiments = ExperimentListFactory.from_filenames([str(path)])
    if len(experiments) != 1:
        raise RuntimeError(f"dxtbx did not read back {path}")
    return experiments[0]


def probe_detector(params, beam, directory):
    """Write a probe image, read it back: the detector exactly as dxtbx sees it.

    Returns (detector, format_name, gap_masks) with gap_masks a list of bool
    (slow, fast) arrays, True where dxtbx's static panel mask excludes a pixel
    (Pilatus inter-module gaps), which the simulator writes as -1.
    """
    probe = os.path.join(directory, "probe_00001.cbf")
    try:
        if params.detector.type == "single":
            pilatus = use_pilatus_header(params)
            header = single_panel_header(params, pilatus)
            data = np.zeros((params.detector.n_slow, params.detector.n_fast), np.int32)
            writer.write_minicbf(probe, data, header)
            expt = read_back(probe)
            detector = expt.detector
            fmt = "miniCBF (%s)" % ("PILATUS_1.2" if pilatus else "GENERIC_MINI")
        else:
            intended = intended_multipanel_detector(params, beam)
            data = [
                np.zeros(p.get_image_size()[::-1], np.int32) for p in intended
            ]
            writer.write_multipanel_cbf(probe, intended, beam, data)
            expt = read_back(probe)
            detector = expt.detector
            # full CBF keeps no sensor description: put it on the truth models
            set_sensor(detector, params)
            fmt = "full CBF (multi-array)"
        format_class = expt.imageset.get_format_class().__name__
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    gap_masks = []
    for panel in detector:
        n_fast, n_slow = panel.get_image_size()
        gaps = np.zeros((n_slow, n_fast), dtype=bool)
        for f0, s0, f1, s1 in panel.get_mask():  # (x0, y0, x1, y1)
            gaps[s0:s1, f0:f1] = True
        gap_masks.append(gaps)
    return detector, f"{fmt}, read by {format_class}", gap_masks

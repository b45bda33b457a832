"""Vectorised geometry and corrections against DIALS' scalar reference functions."""

import math

import numpy as np
import pytest
from dxtbx.model import BeamFactory, Crystal, GoniometerFactory, ScanFactory
from dxtbx.model.detector import DetectorFactory
from dxtbx.model.experiment_list import Experiment
from scitbx import matrix

from dials.algorithms.integration import Corrections
from dials.algorithms.spot_prediction import PixelToMillerIndex

from dials_diffuse import corrections, geometry


def tilted_multipanel_detector():
    """Two panels, one tilted and offset, with a parallax-corrected px->mm strategy."""
    from dxtbx.model import ParallaxCorrectedPxMmStrategy

    det = DetectorFactory.simple(
        "PAD", 200.0, (40.0, 45.0), "+x", "-y", (0.172, 0.172), (120, 100), (-1, 1e6)
    )
    second = det.add_panel()
    rot = matrix.col((0.2, 1, 0.1)).normalize().axis_and_angle_as_r3_rotation_matrix(
        12, deg=True
    )
    fast = rot * matrix.col((1, 0, 0))
    slow = rot * matrix.col((0, -1, 0))
    second.set_frame(fast, slow, (10.0, 30.0, -190.0))
    second.set_image_size((90, 80))
    second.set_pixel_size((0.172, 0.172))
    second.set_trusted_range((-1, 1e6))
    for panel in det:
        panel.set_thickness(0.45)
        panel.set_mu(3.96)
        panel.set_material("Si")
        panel.set_px_mm_strategy(ParallaxCorrectedPxMmStrategy(3.96, 0.45))
    return det


@pytest.fixture
def models():
    beam = BeamFactory.simple(0.9795)
    beam.set_polarization_fraction(0.95)
    beam.set_polarization_normal((0, 1, 0))
    det = tilted_multipanel_detector()
    crystal = Crystal(
        real_space_a=(35.1, 5.0, -3.0),
        real_space_b=(-4.0, 52.2, 2.0),
        real_space_c=(6.0, 1.0, 70.3),
        space_group_symbol="P 1",
    )
    return beam, det, crystal


def sample_indices(n_total, n=200, seed=0):
    return np.random.default_rng(seed).choice(n_total, size=min(n, n_total), replace=False)


def test_still_hkl_matches_pixel_to_miller_index(models):
    beam, det, crystal = models
    reference = PixelToMillerIndex(beam, det, crystal)
    setting = geometry.setting_matrix(
        Experiment(beam=beam, detector=det, crystal=crystal)
    )
    for panel_geometry in geometry.detector_geometry(det):
        q = geometry.scattering_vectors(panel_geometry.unit_s1, beam.get_s0())
        hkl = geometry.miller_indices(q, setting)
        for i in sample_indices(panel_geometry.n_pixels):
            x = panel_geometry.fast[i] + 0.5
            y = panel_geometry.slow[i] + 0.5
            expected = reference.h(panel_geometry.panel_id, x, y)
            assert hkl[i] == pytest.approx(expected, abs=1e-6)
            assert q[i] == pytest.approx(
                reference.q(panel_geometry.panel_id, x, y), abs=1e-9
            )


@pytest.mark.parametrize("first_image", [1, 4])
@pytest.mark.parametrize("position", [0, 7, 16])
def test_rotation_hkl_matches_pixel_to_miller_index(models, first_image, position):
    beam, det, crystal = models
    gonio = GoniometerFactory.known_axis((0.0, 1.0, 0.1))
    gonio.set_fixed_rotation((1, 0, 0, 0, math.cos(0.1), -math.sin(0.1), 0, math.sin(0.1), math.cos(0.1)))
    # a scan that need not start at image 1 (a sweep imported from image 4):
    # DIALS' frame is the absolute array index first + position
    scan = ScanFactory.make_scan((first_image, 20), 0.0, (10.0, 0.5), [0] * (21 - first_image), deg=True)
    experiment = Experiment(
        beam=beam, detector=det, crystal=crystal, goniometer=gonio, scan=scan
    )
    assert not experiment.is_still()
    reference = PixelToMillerIndex(beam, det, gonio, scan, crystal)
    frame = geometry.absolute_frame(scan, position)
    assert frame == first_image - 1 + position
    setting = geometry.setting_matrix(experiment, frame)
    z = frame + 0.5  # centre of the image in array-index units
    for panel_geometry in geometry.detector_geometry(det, pixel_step=3):
        q = geometry.scattering_vectors(panel_geometry.unit_s1, beam.get_s0())
        hkl = geometry.miller_indices(q, setting)
        for i in sample_indices(panel_geometry.n_pixels, 100):
            x = panel_geometry.fast[i] + 0.5
            y = panel_geometry.slow[i] + 0.5
            expected = reference.h(panel_geometry.panel_id, x, y, z)
            assert hkl[i] == pytest.approx(expected, abs=1e-6)


def test_q_magnitude_is_inverse_d_spacing(models):
    beam, det, _ = models
    panel_geometry = geometry.panel_geometry(det[0], 0)
    q = geometry.scattering_vectors(panel_geometry.unit_s1, beam.get_s0())
    resolution = det[0].get_resolution_at_pixel(beam.get_s0(), (10.5, 20.5))
    i = np.flatnonzero((panel_geometry.fast == 10) & (panel_geometry.slow == 20))[0]
    assert 1.0 / np.linalg.norm(q[i]) == pytest.approx(resolution, rel=1e-9)


def test_polarization_and_efficiency_match_dials_corrections(models):
    beam, det, _ = models
    reference = Corrections(beam, det)
    for panel_geometry in geometry.detector_geometry(det):
        panel = det[panel_geometry.panel_id]
        factors = corrections.correction_factors(panel_geometry, beam, panel)
        s1 = panel_geometry.unit_s1 / beam.get_wavelength()
        for i in sample_indices(panel_geometry.n_pixels):
            # DIALS' stills lp() is 1/P (a multiplier); qe() is the efficiency
            assert factors.polarization[i] == pytest.approx(
                1.0 / reference.lp(tuple(s1[i])), rel=1e-12
            )
            assert factors.efficiency[i] == pytest.approx(
                reference.qe(tuple(s1[i]), panel_geometry.panel_id), rel=1e-12
            )


@pytest.mark.parametrize("parallax", [True, False])
def test_solid_angle_matches_pixel_corners(models, parallax):
    """Omega against the exact solid angle of the quadrilateral of the pixel's
    four corners, each mapped by dxtbx's own pixel_to_millimeter (with the
    parallax correction: the smaller sensor patch whose rays the pixel
    records, 0.2-0.3 % below px py cos / r^2)."""
    from dxtbx.model import SimplePxMmStrategy

    _, det, _ = models
    panel = det[1]
    if not parallax:
        panel.set_px_mm_strategy(SimplePxMmStrategy())
    panel_geometry = geometry.panel_geometry(panel, 1)
    omega = corrections.solid_angle(panel_geometry)
    nominal = panel_geometry.pixel_area_mm2 * panel_geometry.cos_incidence / panel_geometry.distance_mm**2
    shrink = omega / nominal
    for i in sample_indices(panel_geometry.n_pixels, 20):
        x, y = panel_geometry.fast[i], panel_geometry.slow[i]
        corners = [
            matrix.col(panel.get_lab_coord(panel.pixel_to_millimeter((float(px), float(py)))))
            for px, py in [(x, y), (x + 1, y), (x + 1, y + 1), (x, y + 1)]
        ]
        exact = sum(
            _triangle_solid_angle(corners[0], corners[k], corners[k + 1]) for k in (1, 2)
        )
        assert omega[i] == pytest.approx(exact, rel=1e-4)
    if parallax:
        assert 0.995 < shrink.min() and shrink.max() < 0.999
    else:
        assert np.allclose(shrink, 1.0)


def _triangle_solid_angle(a, b, c):
    la, lb, lc = a.length(), b.length(), c.length()
    numerator = abs(a.dot(b.cross(c)))
    denominator = la * lb * lc + a.dot(b) * lc + a.dot(c) * lb + b.dot(c) * la
    return 2.0 * math.atan2(numerator, denominator)


def test_polarization_unpolarised_is_classic_formula():
    beam = BeamFactory.simple(1.0)
    beam.set_polarization_fraction(0.5)
    unit_s1 = np.array([[math.sin(0.6), 0.0, -math.cos(0.6)]])
    p = corrections.polarization_factor(
        unit_s1, beam.get_s0(), beam.get_polarization_normal(), 0.5
    )
    assert p[0] == pytest.approx((1 + math.cos(0.6) ** 2) / 2)


def test_air_transmission_sanity_values():
    # 12.4 keV (1.0 A) over 200 mm of air at 20 C, 1 atm: roughly 90-93 %;
    # NIST's air table interpolated log-log gives mu/rho = 2.77 cm^2/g there,
    # so with rho = 1.205e-3 g/cm^3 the transmission is 0.9355.
    mu = corrections.air_attenuation_coefficient(1.0, 293.15, 1.0)
    assert math.exp(-mu * 200.0) == pytest.approx(0.9355, abs=0.005)
    # ideal gas: attenuation scales with pressure and 1/temperature
    assert corrections.air_attenuation_coefficient(1.0, 293.15, 0.5) == pytest.approx(
        mu / 2
    )
    assert corrections.air_attenuation_coefficient(1.0, 586.3, 1.0) == pytest.approx(
        mu / 2
    )
    # softer X-rays are absorbed more
    assert corrections.air_attenuation_coefficient(1.5, 293.15, 1.0) > mu


def test_air_attenuation_against_tabulated_mass_attenuation():
    """mu/rho of dry air at 10 keV is 5.12 cm^2/g (NIST XCOM/FFAST tables)."""
    wavelength = 12.398419843 / 10.0
    mu = corrections.air_attenuation_coefficient(wavelength, 273.15, 1.0)
    density_air_stp = 1.2929e-3  # g/cm^3 at 0 C, 1 atm
    mu_rho = mu * 10.0 / density_air_stp
    assert mu_rho == pytest.approx(5.12, rel=0.05)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("strategy", ["simple", "parallax", "offset"])
def test_pixel_lab_coordinates_match_dxtbx(strategy, compiled, monkeypatch):
    """The px->mm->lab path, compiled (numba) and numpy, equals dxtbx's
    per-pixel calls on a tilted, offset panel for every strategy (the offset
    one goes through dxtbx)."""
    from dxtbx import flumpy

    from dials_diffuse import compiled as compiled_loops

    if compiled and compiled_loops.lazy_jit(
            "geometry.lab_coordinates", geometry._define_lab_coordinates) is None:
        pytest.skip("numba is not available")
    if not compiled:
        compiled_loops.disable("geometry.lab_coordinates", monkeypatch)
    from dxtbx.model import OffsetParallaxCorrectedPxMmStrategy, SimplePxMmStrategy
    from scitbx.array_family import flex

    det = tilted_multipanel_detector()
    for panel in det:
        if strategy == "simple":
            panel.set_px_mm_strategy(SimplePxMmStrategy())
        elif strategy == "offset":
            n_fast, n_slow = panel.get_image_size()
            dx = flex.double(flex.grid(n_slow, n_fast), 0.01)
            dy = flex.double(flex.grid(n_slow, n_fast), -0.02)
            panel.set_px_mm_strategy(OffsetParallaxCorrectedPxMmStrategy(3.96, 0.45, dx, dy))
    rng = np.random.default_rng(3)
    for panel in det:
        n_fast, n_slow = panel.get_image_size()
        x = rng.uniform(0, n_fast, 500)
        y = rng.uniform(0, n_slow, 500)
        ours = geometry.pixel_lab_coordinates(panel, x, y)
        mm = panel.pixel_to_millimeter(flumpy.vec_from_numpy(np.stack([x, y], axis=1)))
        reference = flumpy.to_numpy(panel.get_lab_coord(mm))
        assert np.abs(ours - reference).max() < 1e-9

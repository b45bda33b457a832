"""simulate_dataset(params): images + truth.expt + truth.json (+ bragg.refl), atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
from scipy.special import ndtr
from dxtbx.imageset import ImageSetFactory
from dxtbx.model import GoniometerFactory, ScanFactory
from dxtbx.model.experiment_list import Experiment, ExperimentList, ExperimentListFactory
from scitbx import matrix

from dials.util import Sorry

from dials_diffuse.io import write_json
from dials_diffuse.simulate import models, writer
from dials_diffuse.simulate import reference_physics as ref
from dials_diffuse.simulate import serial
from dials_diffuse.simulate.diffuse_model import DiffuseParameters, laue_rotations
from dials_diffuse.simulate.params import phil_scope
from dials_diffuse.simulate.truth import BRAGG_REFL, TRUTH_EXPT, TRUTH_JSON, Truth

logger = logging.getLogger("dials.diffuse_simulate")

CONVENTIONS = {
    "counts": "photons ~ Poisson(mu), mu = scale_i * D(hkl) * P * Omega * eta * T_air "
    "* exposure_time * flux + background_photons + bragg_counts * gain (in the "
    "beamstop shadow mu *= beamstop.transmission); counts = rint(photons / gain)",
    "extraction": "I = (counts * gain - background_photons) / (P * Omega * eta * T_air) "
    "/ exposure_time = scale_i * flux * D(hkl) (away from Bragg peaks)",
    "gain": "photons per count (counts * gain = photons); the dxtbx panel gain stays 1",
    "flux": "photons per unit D per steradian per second",
    "scales": "per-image multiplier of D, keyed by 0-based image index, mean 1",
    "hkl": "fractional hkl = M^-1 q at the image centre (M = A for a still, "
    "S R(phi) F A for a rotation image, phi = start + (frame - first_frame + 0.5) * "
    "width); q = s1 - s0, |s0| = 1/lambda",
    "frames": "rotation image i (0-based) is absolute frame (array index) "
    "first_image - 1 + i and file number first_image + i",
    "pixels": "(panel, slow, fast), 0-based; arrays have shape (n_slow, n_fast)",
    "bragg": "photons_full * scale_i (* rocking-curve fraction for rotation) / gain "
    "counts as a pixel-integrated 2-D Gaussian of sigma sigma_px; no P/Omega/eta/T_air "
    "applied; rotation: fraction on image k = Phi((phi_k_end - phi_c) / s) - "
    "Phi((phi_k_start - phi_c) / s), s = mosaicity_deg / |zeta| (rocking_sigma_deg)",
    "images": "image file i (0-based) is images[i]; stills: experiment i",
}


# --------------------------------------------------------------------------
def _phil_text(params) -> str:
    return phil_scope.format(params).as_str()


def _image_scales(params, experiments, rng):
    """Per-image scale factors, mean 1: log-normal, or smooth in phi."""
    n = params.n_images
    period = params.scale.phi_period
    if period is not None and params.mode == "rotation":
        scan = experiments[0].scan
        first = scan.get_array_range()[0]
        phi = np.rad2deg([ref.frame_centre_angle(scan, first + i) for i in range(n)])
        scales = 1.0 + params.scale.spread * np.sin(2 * np.pi * phi / period)
    else:
        scales = rng.lognormal(0.0, params.scale.spread, n)
    return scales / scales.mean()


def _build_experiments(params, beam, detector, rng_orient):
    """In-memory experiments (no imagesets) and the U matrices used."""
    uc, sgi = models.crystal_symmetry(params.crystal.unit_cell, params.crystal.space_group)
    if params.mode == "stills":
        Us = models.random_rotations(rng_orient, params.n_images)
        experiments = ExperimentList()
        cells = serial.still_cells(params, uc, sgi)  # issue 15: cell spread
        for U, cell in zip(Us, cells):
            experiments.append(
                Experiment(beam=beam, detector=detector, crystal=models.make_crystal(cell, sgi, U))
            )
        return experiments, Us
    U = models.random_rotations(rng_orient, 1)[0]
    crystal = models.make_crystal(uc, sgi, U)
    gonio = GoniometerFactory.single_axis()
    first = params.rotation.first_image
    scan = ScanFactory.make_scan(
        image_range=(first, first + params.n_images - 1),
        exposure_times=params.exposure_time,
        oscillation=(params.rotation.start, params.rotation.oscillation),
        epochs={first + i: float(i) * params.exposure_time for i in range(params.n_images)},
        deg=True,
    )
    if params.rotation.scan_varying:
        axis = matrix.col((0.0, 1.0, 1.0)).normalize()
        A = matrix.sqr(crystal.get_A())
        n_pts = params.n_images + 1
        crystal.set_A_at_scan_points(
            [
                axis.axis_and_angle_as_r3_rotation_matrix(
                    params.rotation.drift_deg * k / params.n_images, deg=True
                )
                * A
                for k in range(n_pts)
            ]
        )
    experiments = ExperimentList()
    experiments.append(
        Experiment(beam=beam, detector=detector, goniometer=gonio, scan=scan, crystal=crystal)
    )
    return experiments, U[None]


#: spots whose rocking curve centre lies outside the scan are predicted this many
#: rocking sigmas of a |zeta| = ZETA_PADDING spot beyond it (their tails reach in)
N_SIGMA_ROCKING = 6.0
ZETA_PADDING = 0.1
#: stills spots are drawn to |delta psi| = this many mosaicity sigmas (partiality 3e-4)
N_SIGMA_PARTIALITY = 4.0


def _bragg_table(params, experiments, truth):
    """Predicted Bragg spots (DIALS predictors) with photons_full per spot.

    Rotation: ``zeta`` (DIALS' m2 . e1), ``rocking_sigma_deg`` = mosaicity / |zeta|,
    ``partiality`` = the fraction of the rocking curve inside the scan; spots are
    predicted N_SIGMA_ROCKING * mosaicity / ZETA_PADDING degrees beyond the scan.
    ``image`` is the 0-based image (position in the scan) holding the spot centre;
    ``sigma_px`` the spot's Gaussian sigma on the detector.
    """
    from dials.array_family import flex

    d_min = params.bragg.d_min
    tables = []
    if params.mode == "stills":
        sigma = np.radians(params.bragg.mosaicity_deg)
        for i, expt in enumerate(experiments):
            refl = _stills_predictions(expt, d_min, N_SIGMA_PARTIALITY * sigma)
            if len(refl) == 0:
                continue
            delpsi = refl["delpsical.rad"].as_numpy_array()
            partiality = np.exp(-0.5 * (delpsi / sigma) ** 2)
            refl["id"] = flex.int(len(refl), i)
            refl["partiality"] = flex.double(partiality)
            refl["photons_full"] = flex.double(params.bragg.intensity * partiality)
            refl["image"] = flex.int(len(refl), i)
            tables.append(refl)
    else:
        from dials.algorithms.spot_prediction import (
            ScanStaticReflectionPredictor,
            ScanVaryingReflectionPredictor,
        )

        # what flex.reflection_table.from_predictions does for an ImageSequence,
        # padded so that spots centred just outside the scan are drawn too
        expt = experiments[0]
        crystal = expt.crystal
        padding = N_SIGMA_ROCKING * params.bragg.mosaicity_deg / ZETA_PADDING
        if crystal.num_scan_points == expt.scan.get_num_images() + 1:
            predictor = ScanVaryingReflectionPredictor(
                expt, dmin=d_min, margin=1, padding=padding
            )
            refl = predictor.for_ub(
                flex.mat3_double(
                    [crystal.get_A_at_scan_point(i) for i in range(crystal.num_scan_points)]
                )
            )
        else:
            predictor = ScanStaticReflectionPredictor(expt, dmin=d_min, padding=padding)
            refl = predictor.for_ub(crystal.get_A())
        if len(refl):
            scan = expt.scan
            start, width = scan.get_oscillation(deg=False)
            end = start + width * scan.get_num_images()
            s1 = refl["s1"].as_numpy_array()
            zeta = ref.zeta(s1, expt.beam.get_s0(), expt.goniometer.get_rotation_axis())
            sigma_deg = params.bragg.mosaicity_deg / np.maximum(np.abs(zeta), 1e-3)
            sigma = np.deg2rad(sigma_deg)
            phi_c = refl["xyzcal.mm"].as_numpy_array()[:, 2]
            inside = ndtr((end - phi_c) / sigma) - ndtr((start - phi_c) / sigma)
            keep = inside > 1e-9
            refl = refl.select(flex.bool(keep))
            phi_c, zeta, sigma_deg, inside = (a[keep] for a in (phi_c, zeta, sigma_deg, inside))
            refl["id"] = flex.int(len(refl), 0)
            refl["zeta"] = flex.double(zeta)
            refl["rocking_sigma_deg"] = flex.double(sigma_deg)
            refl["partiality"] = flex.double(inside)
            refl["photons_full"] = flex.double(len(refl), float(params.bragg.intensity))
            refl["image"] = flex.int(np.floor((phi_c - start) / width).astype(np.int32))
            tables.append(refl)
    table = flex.reflection_table()
    for t in tables:
        table.extend(t)
    if len(table):
        table["sigma_px"] = flex.double(_spot_sigma_px(params, truth, table))
    return table


def _stills_predictions(expt, d_min, max_delpsi):
    """DIALS' stills predictions of every reflection with |delta psi| <= max_delpsi
    (rad) that meets the detector. ``for_ub`` keeps only |delta psi| < 0.0015 rad,
    which would cut the partiality curve of a realistic mosaicity."""
    from cctbx import crystal as cctbx_crystal
    from cctbx import miller

    from dials.algorithms.spot_prediction import StillsReflectionPredictor
    from dials.array_family import flex

    crystal = expt.crystal
    if d_min is None:
        d_min = expt.detector.get_max_resolution(expt.beam.get_s0())
    symmetry = cctbx_crystal.symmetry(
        crystal.get_unit_cell(), space_group=crystal.get_space_group()
    )
    # every index of the sphere but the systematic absences (as DIALS' IndexGenerator)
    indices = (
        miller.build_set(symmetry, anomalous_flag=True, d_min=d_min).expand_to_p1().indices()
    )
    if len(indices) == 0:
        return []
    hkl = np.array(indices, dtype=float).reshape(-1, 3)
    s0 = np.array(expt.beam.get_s0())
    r = hkl @ np.reshape(crystal.get_A(), (3, 3)).T
    rlen = np.sqrt(np.einsum("ij,ij->i", r, r))
    excitation = np.abs(np.sqrt(np.einsum("ij,ij->i", r + s0, r + s0)) - np.sqrt(s0 @ s0))
    near = np.flatnonzero(excitation <= 2.0 * max_delpsi * rlen + 1e-9)
    if near.size == 0:
        return []
    refl = StillsReflectionPredictor(expt, dmin=d_min)(
        indices.select(flex.size_t(near.astype(np.uint64)))
    )
    if len(refl) == 0:
        return refl
    keep = np.abs(refl["delpsical.rad"].as_numpy_array()) <= max_delpsi
    return refl.select(flex.bool(keep))


def _spot_sigma_px(params, truth, table):
    """sigma_px, widened by the beam divergence over the sample-spot distance r."""
    sigma = np.full(len(table), float(params.bragg.sigma_px))
    divergence = np.deg2rad(params.bragg.divergence_deg)
    if divergence <= 0:
        return sigma
    xyz = table["xyzcal.px"].as_numpy_array()
    panel = table["panel"].as_numpy_array().astype(int)
    for p in np.unique(panel):
        sel = panel == p
        lab = ref.lab_coordinates(truth.detector[int(p)], xyz[sel, 0], xyz[sel, 1])
        r = np.sqrt(np.einsum("ij,ij->i", lab, lab))
        pixel = min(truth.detector[int(p)].get_pixel_size())
        sigma[sel] = np.hypot(sigma[sel], r * divergence / pixel)
    return sigma


def _choose_bad_pixels(params, truth, rng):
    """Hot and dead pixels among the pixels that are not gaps or shadowed."""
    candidates = []
    for p, (gap, shadow) in enumerate(zip(truth.gaps(), truth.shadow())):
        slow, fast = np.nonzero(~(gap | shadow))
        candidates.append(np.stack([np.full(slow.size, p), slow, fast], axis=1))
    candidates = np.concatenate(candidates)
    n_hot, n_dead = params.hot_pixels.count, params.dead_pixels.count
    if n_hot + n_dead > len(candidates):
        raise Sorry("hot_pixels.count, dead_pixels.count: more than the detector has")
    pick = rng.choice(len(candidates), size=n_hot + n_dead, replace=False)
    chosen = candidates[pick]
    return chosen[:n_hot].tolist(), chosen[n_hot:].tolist()


def _truth_dict(params, beam, detector, Us, scales, fmt):
    uc, sgi = models.crystal_symmetry(params.crystal.unit_cell, params.crystal.space_group)
    c = params.corrections
    d = params.detector
    return {
        "format_version": 1,
        "generator": "dials.diffuse_simulate",
        "mode": params.mode,
        "n_images": params.n_images,
        "random_seed": params.random_seed,
        "images": [],
        "experiments": TRUTH_EXPT,
        "crystal": {
            "unit_cell": list(uc.parameters()),
            "space_group": str(sgi),
            "space_group_hall": sgi.type().hall_symbol(),
            "laue_group": str(sgi.group().build_derived_laue_group().info()),
            "n_laue_operators": int(len(laue_rotations(str(sgi)))),
            "U": [np.asarray(U).tolist() for U in Us],
            "scan_varying": bool(params.mode == "rotation" and params.rotation.scan_varying),
            # issue 15 (simulate/serial.py): each still's crystal and its cell
            "cell_spread": params.crystal.cell_spread,
            "crystal_of_still": (serial.crystal_of_still(params).tolist()
                                 if params.mode == "stills" else [0]),
        },
        "beam": {
            "wavelength": beam.get_wavelength(),
            "s0": list(beam.get_s0()),
            "polarization_fraction": beam.get_polarization_fraction(),
            "polarization_normal": list(beam.get_polarization_normal()),
        },
        "detector": {
            "type": d.type,
            "format": fmt,
            "n_panels": len(detector),
            "image_sizes": [list(p.get_image_size()) for p in detector],
            "pixel_size_mm": d.pixel_size,
            "distance_mm": d.distance,
            "sensor_material": d.sensor.material,
            "sensor_thickness_mm": [p.get_thickness() for p in detector],
            "sensor_mu_per_mm": [p.get_mu() for p in detector],
            "overload": d.overload,
            "n_gap_pixels": 0,
        },
        "rotation": {
            "start_deg": params.rotation.start,
            "oscillation": params.rotation.oscillation,
            "first_image": params.rotation.first_image,
            "array_range": [params.rotation.first_image - 1,
                            params.rotation.first_image - 1 + params.n_images],
            "phi_subsamples": params.rotation.phi_subsamples,
            "scan_varying": params.rotation.scan_varying,
            "drift_deg": params.rotation.drift_deg,
        }
        if params.mode == "rotation"
        else {"phi_subsamples": 1},
        "diffuse": DiffuseParameters(
            unit_cell=tuple(uc.parameters()),
            space_group=str(sgi),
            isotropic_amplitude=params.diffuse.isotropic.amplitude,
            isotropic_q0=params.diffuse.isotropic.q0,
            isotropic_width=params.diffuse.isotropic.width,
            halo_amplitude=params.diffuse.halo.amplitude,
            halo_width=params.diffuse.halo.width,
            streak_amplitude=params.diffuse.streak.amplitude,
            streak_length=params.diffuse.streak.length,
            streak_width=params.diffuse.streak.width,
            lobe_amplitude=params.diffuse.lobe.amplitude,
            lobe_direction=tuple(params.diffuse.lobe.direction),
            lobe_angle=params.diffuse.lobe.angle,
            lobe_q0=params.diffuse.lobe.q0,
            lobe_q_width=params.diffuse.lobe.q_width,
        ).as_dict(),
        "absolute": {
            "composition": params.diffuse.absolute.composition,
            "contrast": params.diffuse.absolute.contrast,
            "units": "D in electron units per unit cell; images also hold the "
            "incoherent scattering (Truth.compton_per_cell)",
        }
        if params.diffuse.absolute.composition
        else None,
        "surfaces": {
            "absorption": params.surfaces.absorption,
            "absorption_period_deg": params.surfaces.absorption_period_deg,
            "response": params.surfaces.response,
        },
        "scales": {str(i): float(s) for i, s in enumerate(scales)},
        "scale_spread": params.scale.spread,
        "flux": params.flux,
        "gain": params.gain,
        "exposure_time": params.exposure_time,
        "noise": params.noise,
        "corrections": {
            "polarization": c.polarization,
            "solid_angle": c.solid_angle,
            "efficiency": c.efficiency,
            "air": c.air,
            "air_temperature": c.air_temperature,
            "air_pressure": c.air_pressure,
            "air_mu_per_mm": ref.air_mu_per_mm(
                beam.get_wavelength(), c.air_temperature, c.air_pressure
            ),
        },
        "background": {
            "constant": params.background.constant,
            "radial_amplitude": params.background.radial_amplitude,
            "radial_width": params.background.radial_width,
            "units": "photons per pixel per image: constant + radial_amplitude * "
            "exp(-|q|^2 / (2 radial_width^2))",
        },
        "beamstop": {
            "radius_mm": params.beamstop.radius,
            "transmission": params.beamstop.transmission,
            "shape": "pixels closer than radius_mm to the direct-beam axis",
            "n_pixels": 0,
        },
        "hot_pixels": {"value": params.hot_pixels.value, "pixels": []},
        "dead_pixels": {"value": 0, "pixels": []},
        "bragg": {
            "enabled": params.bragg.enabled,
            "intensity": params.bragg.intensity,
            "sigma_px": params.bragg.sigma_px,
            "mosaicity_deg": params.bragg.mosaicity_deg,
            "divergence_deg": params.bragg.divergence_deg,
            "rocking_n_sigma": N_SIGMA_ROCKING,
            "d_min": params.bragg.d_min,
            "table": BRAGG_REFL if params.bragg.enabled else None,
            "n_spots_per_image": {},
        },
        "conventions": CONVENTIONS,
        "phil": _phil_text(params),
    }


def _relative_paths(expt_dict, tmpdir):
    """Image paths in an ExperimentList dict made relative to the dataset directory."""
    for imageset in expt_dict.get("imageset", []):
        for key in ("template", "mask", "gain", "pedestal", "dx", "dy"):
            value = imageset.get(key)
            if isinstance(value, str) and value.startswith(str(tmpdir)):
                imageset[key] = os.path.relpath(value, tmpdir)
        if "images" in imageset:
            imageset["images"] = [
                os.path.relpath(p, tmpdir) if str(p).startswith(str(tmpdir)) else p
                for p in imageset["images"]
            ]
    return expt_dict


def _image_experiments(params, paths, experiments, beam, detector):
    """The truth ExperimentList with imagesets on the written files."""
    if params.mode == "stills":
        imageset = ImageSetFactory.make_imageset([str(p) for p in paths])
        out = ExperimentList()
        for i, expt in enumerate(experiments):
            single = imageset[i : i + 1]
            single.set_beam(beam, 0)
            single.set_detector(detector, 0)
            out.append(
                Experiment(imageset=single, beam=beam, detector=detector, crystal=expt.crystal)
            )
        return out
    read = ExperimentListFactory.from_filenames([str(p) for p in paths])
    if len(read) != 1:
        raise RuntimeError("the rotation images did not import as one sequence")
    sequence = read[0].imageset
    expt = experiments[0]
    read_range = sequence.get_scan().get_image_range()
    if tuple(read_range) != tuple(expt.scan.get_image_range()):
        raise RuntimeError(
            f"dxtbx read the scan as images {read_range}, written as "
            f"{expt.scan.get_image_range()}"
        )
    sequence.set_beam(beam)
    sequence.set_detector(detector)
    sequence.set_goniometer(expt.goniometer)
    sequence.set_scan(expt.scan)
    out = ExperimentList()
    out.append(
        Experiment(
            imageset=sequence,
            beam=beam,
            detector=detector,
            goniometer=expt.goniometer,
            scan=expt.scan,
            crystal=expt.crystal,
        )
    )
    return out


@contextlib.contextmanager
def _staging_directory(output):
    """A temporary directory beside ``output``, renamed to it on success."""
    output = pathlib.Path(output).absolute()
    parent = output.parent
    if output.exists():
        raise Sorry(f"output.directory: {output} exists (set output.overwrite=True)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".part", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise Sorry(f"output.directory: cannot write in {parent} ({e.strerror})") from None
    try:
        yield pathlib.Path(tmp)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def simulate_dataset(params) -> pathlib.Path:
    """Simulate a dataset described by ``params`` (the PHIL extract).

    Returns the absolute path of the dataset directory. Raises Sorry on bad input,
    leaving nothing behind.
    """
    t0 = time.time()
    models.validate(params)
    output = pathlib.Path(params.output.directory).absolute()
    if output.exists() and params.output.overwrite:
        if not output.is_dir() or not (
            (output / TRUTH_JSON).exists() or not any(output.iterdir())
        ):
            raise Sorry(
                f"output.directory: {output} is not a simulated dataset; not overwriting"
            )
        trash = output.with_name(f".{output.name}.old.{os.getpid()}")
        os.rename(output, trash)
        try:
            path = _simulate_into(params, output, t0)
        except BaseException:
            os.rename(trash, output)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return path
    return _simulate_into(params, output, t0)


def _simulate_into(params, output, t0):
    from dials.array_family import flex

    root = np.random.SeedSequence(params.random_seed)
    ss_orient, ss_scale, ss_pixels, ss_noise = root.spawn(4)
    noise_seeds = ss_noise.spawn(params.n_images)

    with _staging_directory(output) as tmpdir:
        beam = models.make_beam(params)
        detector, fmt, _ = models.probe_detector(params, beam, str(tmpdir))
        experiments, Us = _build_experiments(
            params, beam, detector, np.random.default_rng(ss_orient)
        )
        n = params.n_images
        scales = _image_scales(params, experiments, np.random.default_rng(ss_scale))
        data = _truth_dict(params, beam, detector, Us, scales, fmt)
        truth = Truth(data, experiments)
        logger.info("Detector: %d panel(s), %s", len(detector), fmt)
        logger.info(
            "Crystal: %s %s, mode %s, %d images",
            " ".join("%g" % x for x in data["crystal"]["unit_cell"]),
            data["crystal"]["space_group"],
            params.mode,
            n,
        )

        gaps = truth.gaps()
        shadow = truth.shadow()
        data["detector"]["n_gap_pixels"] = int(sum(g.sum() for g in gaps))
        data["beamstop"]["n_pixels"] = int(sum(s.sum() for s in shadow))
        hot, dead = _choose_bad_pixels(params, truth, np.random.default_rng(ss_pixels))
        data["hot_pixels"]["pixels"] = hot
        data["dead_pixels"]["pixels"] = dead

        if params.bragg.enabled:
            table = _bragg_table(params, experiments, truth)
        else:
            table = flex.reflection_table()
        truth._bragg = table
        counts_per_image = np.zeros(n, int)
        if len(table):
            image = table["image"].as_numpy_array()
            image = image[(image >= 0) & (image < n)]
            counts_per_image = np.bincount(image, minlength=n)
        data["bragg"]["n_spots_per_image"] = {
            str(i): int(c) for i, c in enumerate(counts_per_image)
        }

        paths = []
        for i in range(n):
            rng = np.random.default_rng(noise_seeds[i])
            images = []
            for p, mu in enumerate(truth.expected_photons(i)):
                # photons are Poisson; the detector reports photons / gain counts
                photons = rng.poisson(mu) if params.noise else mu
                counts = np.rint(photons / params.gain)
                counts = np.clip(counts, 0, np.iinfo(np.int32).max).astype(np.int32)
                counts[gaps[p]] = -1
                images.append(counts)
            for p, s, f in hot:
                images[p][s, f] = params.hot_pixels.value
            for p, s, f in dead:
                images[p][s, f] = 0
            number = i + (params.rotation.first_image if params.mode == "rotation" else 1)
            name = "%s_%05d.cbf" % (params.output.prefix, number)
            path = tmpdir / name
            if params.detector.type == "single":
                pilatus = "PILATUS" in fmt
                if params.mode == "rotation":
                    start = params.rotation.start + i * params.rotation.oscillation
                    header = models.single_panel_header(
                        params, pilatus, i, start, params.rotation.oscillation
                    )
                else:
                    header = models.single_panel_header(params, pilatus, i)
                writer.write_minicbf(str(path), images[0], header)
            else:
                writer.write_multipanel_cbf(str(path), detector, beam, images)
            paths.append(path)
            data["images"].append(name)
            if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
                logger.info("Wrote image %d/%d", i + 1, n)

        expts = _image_experiments(params, paths, experiments, beam, detector)
        expt_dict = _relative_paths(expts.to_dict(), tmpdir)
        with open(tmpdir / TRUTH_EXPT, "w") as fh:
            json.dump(expt_dict, fh, indent=2)
        if len(table):
            table.as_file(str(tmpdir / BRAGG_REFL))
        write_json(str(tmpdir / TRUTH_JSON), data)

    logger.info(
        "Wrote %d images, %s and %s to %s in %.1f s",
        params.n_images,
        TRUTH_EXPT,
        TRUTH_JSON,
        output,
        time.time() - t0,
    )
    return output

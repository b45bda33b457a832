"""Image writers: miniCBF (single panel) and full multi-array CBF (multi-panel).

miniCBF: a PILATUS_1.2 or GENERIC_MINI header read by dxtbx's FormatCBFMiniPilatus
or FormatCBFMini. Geometry in the header is a detector normal to the beam with fast
+x, slow -y, so the simulator builds its truth detector by reading a probe file
back through dxtbx: the truth is exactly what dxtbx reads.

Multi-panel: dxtbx's FullCBFWriter header (axis hierarchy) with CBF_PACKED int32
arrays, one per panel, read back by FormatCBFMultiTileHierarchyStill. The
FullCBFWriter data path passes a str byte order that Debian's pycbf rejects, so
the array data are added here.
"""

from __future__ import annotations

import numpy as np
import pycbf
from dxtbx import flumpy

MINICBF_HEADER = """
# Detector: %(det_type)s, S/N 60-0000
# %(timestamp)s
# Pixel_size %(pixel_um)se-6 m x %(pixel_um)se-6 m
# %(sensor)s sensor, thickness %(thickness_m).9f m
# Exposure_time %(exposure).7f s
# Exposure_period %(exposure).7f s
# Tau = 0 s
# Count_cutoff %(count_cutoff)d counts
# Threshold_setting: %(threshold)d eV
# Gain_setting: autog (vrf = 1.000)
# N_excluded_pixels = 0
# Excluded_pixels: badpix_mask.tif
# Flat_field: (nil)
# Trim_file: (nil)
# Image_path: /ramdisk/
# Wavelength %(wavelength)r A
# Detector_distance %(distance_m)r m
# Beam_xy (%(beam_x)r, %(beam_y)r) pixels
# Flux 0
# Filter_transmission 1.0000
# Start_angle %(start)r deg.
# Angle_increment %(increment)r deg.
# Polarization %(polarization).4f
# Detector_2theta 0.0000 deg.
# Kappa 0.0000 deg.
# Phi %(start)r deg.
"""


def minicbf_header(
    *,
    pilatus: bool,
    pixel_size_mm: float,
    sensor: str,
    thickness_mm: float,
    exposure: float,
    count_cutoff: int,
    wavelength: float,
    distance_mm: float,
    beam_centre_px: tuple,
    start_deg: float = 0.0,
    increment_deg: float = 0.0,
    polarization: float = 0.999,
    image_number: int = 0,
) -> tuple:
    """(header_convention, header_contents) of a miniCBF image."""
    seconds = int(image_number * max(exposure, 0.001))
    hh, rem = divmod(seconds, 3600)
    mm, ss = divmod(rem, 60)
    values = dict(
        det_type="PILATUS3 6M" if pilatus else "GENERIC",
        timestamp="2024-01-01T%02d:%02d:%02d.000" % (hh % 24, mm, ss),
        pixel_um=repr(float(pixel_size_mm) * 1000.0),
        sensor=sensor,
        thickness_m=thickness_mm / 1000.0,
        exposure=exposure,
        count_cutoff=count_cutoff,
        threshold=int(12398.4 / wavelength / 2),
        wavelength=float(wavelength),
        distance_m=float(distance_mm) / 1000.0,
        beam_x=float(beam_centre_px[0]),
        beam_y=float(beam_centre_px[1]),
        start=float(start_deg),
        increment=float(increment_deg),
        polarization=polarization,
    )
    convention = "PILATUS_1.2" if pilatus else "GENERIC_MINI"
    return convention, MINICBF_HEADER % values


def write_minicbf(path: str, data: np.ndarray, header: tuple) -> None:
    """Write an int32 (slow, fast) array as a byte-offset miniCBF."""
    convention, contents = header
    data = np.ascontiguousarray(data, dtype=np.int32)
    from dxtbx.format.FormatCBFMultiTile import cbf_wrapper

    cbf = cbf_wrapper()
    cbf.new_datablock(b"image_1")
    cbf.add_category("array_data", ["header_convention", "header_contents", "data"])
    cbf.add_row([convention, contents])
    _set_int32_array(cbf, pycbf.CBF_BYTE_OFFSET, 1, data)
    _write_cbf(cbf, path)


class _FakeReader:
    class format_class:  # noqa: N801 - mimics a class attribute
        pass


_FakeReader.format_class.__name__ = "FormatDiffuseSimulation"


class _ModelImageSet:
    """Just enough of an imageset for FullCBFWriter.get_cbf_handle."""

    def __init__(self, detector, beam, path):
        self._detector = detector
        self._beam = beam
        self._path = str(path)

    def get_detector(self, index=None):
        return self._detector

    def get_beam(self, index=None):
        return self._beam

    def paths(self):
        return [self._path]

    def reader(self):
        return _FakeReader


def write_multipanel_cbf(path: str, detector, beam, data) -> None:
    """Write one int32 (slow, fast) array per panel as a full CBF."""
    from dxtbx.format.cbf_writer import FullCBFWriter

    writer = FullCBFWriter(imageset=_ModelImageSet(detector, beam, path))
    cbf = writer.get_cbf_handle(header_only=True)
    names = ["ARRAY_PANEL_%d" % i for i in range(len(detector))]
    cbf.add_category(
        "array_structure", ["id", "encoding_type", "compression_type", "byte_order"]
    )
    for name in names:
        cbf.add_row([name, "signed 32-bit integer", "packed", "little_endian"])
    cbf.add_category("array_data", ["array_id", "binary_id", "data"])
    for i, (name, panel_data) in enumerate(zip(names, data)):
        arr = np.ascontiguousarray(panel_data, dtype=np.int32)
        cbf.add_row([name, str(i + 1)])
        _set_int32_array(cbf, pycbf.CBF_PACKED, i + 1, arr)
    _write_cbf(cbf, path)


def _set_int32_array(cbf, compression, binary_id: int, arr: np.ndarray) -> None:
    """Store a signed little-endian int32 (slow, fast) array in the current row."""
    slow, fast = arr.shape
    cbf.set_integerarray_wdims_fs(
        compression, binary_id, arr.tobytes(), 4, 1, arr.size, b"little_endian",
        fast, slow, 1, 0,
    )


def _write_cbf(cbf, path) -> None:
    cbf.write_widefile(
        str(path).encode(), pycbf.CBF, pycbf.MIME_HEADERS | pycbf.MSG_DIGEST | pycbf.PAD_4K, 0
    )


def as_flex_int(arr: np.ndarray):
    return flumpy.from_numpy(np.ascontiguousarray(arr, dtype=np.int32))

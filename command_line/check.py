"""
Visual diagnostics of extracted and of merged diffuse scattering.

The mode follows from the inputs.

Extraction mode (one extracted image): give the experiments and a per-image
file of dials.diffuse_extract, or its output directory and image=<still id>
(default: the first extracted image). Mask pickles written with
output.masks=True beside the file are used automatically; other masks
(pixel_mask_*, bragg_mask_*, total_mask_* pickles) and a background map (.npy)
may be named. The raw image is read through the experiments (or, without
them, from the image path stored in the file). Outputs in output.directory
(default extraction_visual_check): diffuse_pixel_overlay.png,
intensity_correction_summary.txt, q_projection_qx_qy.png,
q_projection_qx_qz.png, q_projection_qy_qz.png, radial_q_distribution.png,
intensity_histogram.png, intensity_heatmap_panel_<n>.png,
sigma_vs_intensity.png, isigi_histogram.png,
extraction_diagnostics_summary.txt (and background_map.png with a map).

Merged mode: give the dials.diffuse_merge output directory, optionally with
the experiments and the extraction directory (per-still context). Outputs in
output.directory (default phase3_diagnostics): grid_summary.txt,
grid_visualization_conceptual.png, voxel_occupancy_slice_{L0,K0,H0}.png,
voxel_occupancy_histogram.png, scaling_params_b_i.png,
scaling_resolution_smoother.png (when the smoother was refined),
scaling_parameters_summary.txt, merged_{intensity,sigma,isigi}_slice_{L0,K0,H0}.png,
merged_anisotropic_slice_{L0,K0,H0}.png, merged_radial_average.png,
merged_intensity_histogram.png, merged_cc_half.png,
phase3_diagnostics_summary.txt. Slices are true central sections (l=0,
k=0, h=0) of the map expanded to P1 by the merge's symmetry.

Both modes write dials.diffuse_check.html, one self-contained page with every
plot and summary. Scatter plots show at most max_plot_points points (a seeded
random subsample).

Examples::

  dials.diffuse_check refined.expt diffuse_extracted/image_000000.npz

  dials.diffuse_check refined.expt diffuse_extracted/ image=3 \\
    output.directory=extraction_visual_check

  dials.diffuse_check refined.expt diffuse_extracted/image_000000.npz \\
    my_masks/bragg_mask.pickle background.npy

  dials.diffuse_check diffuse_merged/ output.directory=phase3_diagnostics

  dials.diffuse_check refined.expt diffuse_extracted/ diffuse_merged/ \\
    max_plot_points=20000
"""

from __future__ import annotations

import logging
import os
from typing import List

import libtbx.phil

import dials.util
import dials.util.log
from dials.util import Sorry
from dials.util.options import ArgumentParser, flatten_experiments

from dials_diffuse.command_util import parse_arguments

from dials_diffuse.diagnostics import run_check
from dials_diffuse.diagnostics.inputs import classify
from dials_diffuse.startup import run_and_exit

logger = logging.getLogger("dials.diffuse_check")

phil_scope = libtbx.phil.parse(
    """
include scope dials_diffuse.phil_scopes.check_phil_scope
output
{
  include scope dials_diffuse.phil_scopes.check_output_phil_scope
  log = dials.diffuse_check.log
    .type = path
}
""",
    process_includes=True,
)


@dials.util.show_mail_handle_errors()
def run(args: List[str] = None, phil: libtbx.phil.scope = phil_scope) -> None:
    usage = (
        "dials.diffuse_check [options] refined.expt diffuse_extracted/image_000000.npz "
        "[masks] [bg.npy]\n       dials.diffuse_check [options] diffuse_merged/ "
        "[refined.expt] [diffuse_extracted/]"
    )
    parser = ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        check_format=False,
        epilog=__doc__,
    )
    params, options, unhandled = parse_arguments(parser, args, phil, logger)
    for arg in unhandled:
        if "=" in arg and not os.path.exists(arg):
            raise Sorry(f"unknown parameter: {arg}")
    found = classify(unhandled, params.input)
    if found.mode is None:
        if not unhandled and not params.input.experiments:
            parser.print_help()
            return
        raise Sorry(
            "nothing to diagnose: give an extraction file or directory "
            "(dials.diffuse_extract) or a merge directory (dials.diffuse_merge)"
        )
    experiments = flatten_experiments(params.input.experiments) if params.input.experiments else None
    run_check(found, params, experiments)


def main() -> None:
    """The console entry point: run(), then exit without the interpreter's
    teardown (startup.run_and_exit)."""
    run_and_exit(run)


if __name__ == "__main__":
    run()

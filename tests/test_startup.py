"""The commands' deferred imports (dials_diffuse.startup): not loaded at
start-up, loaded and working when DIALS code does use them."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys
{prelude}
import command_line.extract  # dials.util.options, dxtbx.model, dials flex
from dxtbx.model import detector_helpers
from dxtbx.model.detector import DetectorFactory
loaded_at_start = [n for n in ("sklearn", "pandas")
                   if n in sys.modules and type(sys.modules[n]).__name__ == "module"]
detector = DetectorFactory.make_detector(
    "PAD", (1, 0, 0), (0, -1, 0), (-10, 10, -100), (0.1, 0.1), (100, 100), (0, 1e6))
detector2 = DetectorFactory.make_detector(
    "PAD", (1, 0, 0), (0, -1, 0), (-10, -1, -100), (0.1, 0.1), (100, 100), (0, 1e6))
detector.add_panel(detector2[0])
axes = detector_helpers.get_detector_projection_2d_axes(detector)
from dials.array_family import flex
table = flex.reflection_table()
table["x"] = flex.double([1.0, 2.0])
import pandas
frame = pandas.DataFrame({{"x": list(table["x"])}})
print(loaded_at_start, repr(axes), float(frame["x"].sum()), type(sys.modules["sklearn"]).__name__)
"""


def run(prelude):
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(prelude=prelude)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_deferred_modules_load_on_use():
    """Importing a command leaves scikit-learn and pandas unloaded; dxtbx's
    multi-panel projection (its DBSCAN) and pandas give what they give
    without the placeholders."""
    deferred = run("")
    plain = run("import dxtbx.model, dials.array_family.flex")  # the real ones first
    assert deferred.startswith("[] "), deferred
    assert plain.startswith("['sklearn', 'pandas'] "), plain
    assert deferred[len("[] "):] == plain[len("['sklearn', 'pandas'] "):]

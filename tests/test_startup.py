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


EXIT_SCRIPT = r"""
import logging, sys
from dials_diffuse.startup import run_and_exit

def run():
    logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
    logging.getLogger("dials.diffuse_test").info("logged before the exit")
    sys.stdout.write("x" * 100000)  # more than a pipe's buffer: flushed at exit
    sys.stdout.write("|the end\n")
    outcome = sys.argv[2]
    if outcome == "sorry":
        sys.exit(1)
    if outcome == "message":
        sys.exit("Sorry: a message")
    if outcome == "error":
        raise RuntimeError("an unexpected error")

run_and_exit(run)
"""


def test_run_and_exit_keeps_status_output_and_log(tmp_path):
    """The console entry points' run_and_exit (no interpreter teardown): the
    exit status of run() (0, a SystemExit code, a SystemExit message as 1),
    every byte written to stdout and the log file flushed; an unexpected
    exception still ends with its traceback and status 1."""
    expected = {"ok": (0, ""), "sorry": (1, ""), "message": (1, "Sorry: a message"),
                "error": (1, "RuntimeError: an unexpected error")}
    for outcome, (status, stderr) in expected.items():
        log = tmp_path / f"{outcome}.log"
        result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(log), outcome],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == status, (outcome, result.stderr[-2000:])
        assert result.stdout == "x" * 100000 + "|the end\n", outcome
        assert stderr in result.stderr, (outcome, result.stderr[-2000:])
        assert "logged before the exit" in log.read_text(), outcome

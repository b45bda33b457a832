"""The README's dials.python examples run, on a simulated dataset, and
return DIALS types (flex arrays, reflection tables, a cctbx miller array)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks():
    """The ```python blocks of the README's "From dials.python" section."""
    text = README.read_text()
    section = text[text.index("### From `dials.python`"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_examples():
    assert len(readme_python_blocks()) >= 2


@pytest.fixture
def in_dataset(simulated_stills, tmp_path, monkeypatch):
    """A working directory with refined.expt (the simulated models)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    models = ExperimentListFactory.from_json_file(str(simulated_stills / "truth.expt"))
    monkeypatch.chdir(tmp_path)
    models.as_file("refined.expt")
    return tmp_path


def test_readme_examples_run_and_return_flex(in_dataset):
    from cctbx import miller

    from dials.array_family import flex

    namespace = {}
    for block in readme_python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    pixels = namespace["pixels"]
    assert isinstance(pixels, flex.reflection_table) and len(pixels) > 1000
    for column in ("xyzobs.px", "s1", "q", "hkl_frac"):
        assert isinstance(pixels[column], flex.vec3_double), column
    assert isinstance(pixels["panel"], flex.size_t)
    for column in ("intensity.sum.value", "intensity.sum.variance", "correction.polarization",
                   "correction.solid_angle", "correction.efficiency", "correction.air",
                   "correction.total"):
        assert isinstance(pixels[column], flex.double), column
    assert len(pixels) == pixels.stages["kept"]
    # q = s1 - s0 and |s1| = 1/lambda
    s0 = namespace["experiments"][0].beam.get_s0()
    diff = (pixels["s1"] - pixels["q"]) - flex.vec3_double(len(pixels), s0)
    assert flex.max(diff.norms()) < 1e-5
    for kind in ("pixel", "bragg", "total"):
        masks = namespace["masks"][kind]
        assert isinstance(masks, tuple) and all(isinstance(m, flex.bool) for m in masks)
    merged = namespace["merged"]
    assert isinstance(merged, miller.array)
    assert isinstance(merged.data(), flex.double) and merged.sigmas() is not None
    assert merged.size() > 100 and merged.d_min() > 0

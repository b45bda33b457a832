"""Serial scale (issue 15): how long loading and matching N still experiments take.

Builds an experiment list of N stills the way dials.stills_process /
dials.ssx_index outputs look to dials.diffuse_extract (one single-image
image set per experiment, one crystal each, shared beam and detector), from
one simulated 256 x 256 still hard-linked under N file names, and times

* ``load``: ``ExperimentListFactory.from_json_file`` of the models
  (``check_format=False``, as dials.diffuse_extract reads them) and of the
  images (``check_format=True``);
* ``match``: ``extraction.plan_tasks(models, images)`` (every image to its model).

    .venv/bin/python bench/many_experiments.py [--n 1000 10000]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import tempfile
import time

import numpy as np

from dxtbx.model import Crystal  # noqa: E402
from dxtbx.model.experiment_list import (  # noqa: E402
    Experiment,
    ExperimentList,
    ExperimentListFactory,
)
from dxtbx.imageset import ImageSetFactory  # noqa: E402
from scitbx import matrix  # noqa: E402

from dials_diffuse.extraction import plan_tasks  # noqa: E402
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset  # noqa: E402


def build(n, work):
    data = simulate_dataset(params_from(**{
        "mode": "stills", "n_images": 1, "random_seed": 5, "detector.format": "generic",
        "detector.n_fast": 256, "detector.n_slow": 256, "output.directory": str(work / "sim")}))
    truth = load_truth(data)
    template = truth.experiments[0]
    source = str(truth.image_path(0))
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    experiments = ExperimentList()
    for i in range(n):
        path = images / f"still_{i:06d}.cbf"
        os.link(source, path)  # hard links: realpath keeps the names apart
        imageset = ImageSetFactory.make_imageset([str(path)])
        axis = rng.normal(size=3)
        rotation = matrix.col(axis / np.linalg.norm(axis)).axis_and_angle_as_r3_rotation_matrix(
            rng.uniform(0, 360), deg=True)
        a, b, c = (rotation * matrix.col(v) for v in template.crystal.get_real_space_vectors())
        crystal = Crystal(a, b, c, template.crystal.get_space_group())
        experiments.append(Experiment(imageset=imageset, beam=template.beam,
                                      detector=template.detector, crystal=crystal,
                                      identifier=f"still-{i}"))
    models = work / "refined.expt"
    experiments.as_file(str(models))
    imported = ExperimentList([Experiment(imageset=e.imageset, beam=e.beam, detector=e.detector)
                               for e in experiments])
    imported.as_file(str(work / "imported.expt"))
    return models, work / "imported.expt"


def measure(n):
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        t0 = time.perf_counter()
        models_path, images_path = build(n, work)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        models = ExperimentListFactory.from_json_file(str(models_path), check_format=False)
        t_models = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = ExperimentListFactory.from_json_file(str(images_path), check_format=True)
        t_images = time.perf_counter() - t0
        t0 = time.perf_counter()
        tasks, skipped = plan_tasks(models, images)
        t_match = time.perf_counter() - t0
        assert len(tasks) == n and not skipped, (len(tasks), len(skipped), skipped[:2])
        assert all(t.experiment_id == i for i, t in enumerate(tasks))
        return {"n": n, "write": t_build, "load models": t_models, "load images": t_images,
                "match": t_match,
                "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    for n in args.n:
        row = measure(n)
        print("  ".join(f"{k} {v:.2f} s" if isinstance(v, float) and k != "peak RSS MB"
                        else f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()

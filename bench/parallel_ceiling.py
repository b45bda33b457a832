"""What two processes can gain on this machine, whatever the program.

Issue 16 asks the whole chain for >= 1.8x from one process to two. This
script measures the ceiling any program meets here: the same units of work
done by one process, then split over two forked processes started together
(wall time until both finish). Nothing of dials_diffuse runs unless
``--extract`` is given. Workloads:

* ``cpu``: a pure-Python integer loop (no memory traffic): what two cores
  give to compute alone;
* ``stream``: numpy passes over 6M-element float64 arrays kept allocated
  (a Pilatus 6M image's size): memory bandwidth shared by two cores;
* ``fresh``: the same passes on newly allocated arrays each unit, as a
  program that does not keep its buffers (first-touch page faults, which
  this VM serialises in part: PERFORMANCE.md, session 8);
* ``extract`` (with ``--extract``): ``extract_image`` on the side-by-side
  benchmark's simulated 6M images (``bench/data/p6m_rot_100``), i.e. our
  extraction loop without start-up, dynamic pass or writing.

Prints a table and writes ``bench/results/<output>``. Example::

    .venv/bin/python bench/parallel_ceiling.py --repeats 5 --extract \\
        --output parallel_ceiling.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

N_PIXELS = 2463 * 2527
EXPT = common.DATA / "p6m_rot_100" / "truth.expt"


def cpu_unit(_):
    total = 0
    for i in range(3_000_000):
        total += i * i & 7
    return total


_KEPT = {}


def stream_unit(_):
    if not _KEPT:
        _KEPT.update(a=np.random.default_rng(1).random(N_PIXELS),
                     b=np.random.default_rng(2).random(N_PIXELS),
                     c=np.empty(N_PIXELS))
    a, b, c = _KEPT["a"], _KEPT["b"], _KEPT["c"]
    for _ in range(6):
        np.multiply(a, b, out=c)
        np.add(c, a, out=c)
        np.sqrt(c, out=c)
    return float(c[0])


def fresh_unit(_):
    a = np.full(N_PIXELS, 1.5)
    b = np.full(N_PIXELS, 2.5)
    for _ in range(6):
        c = a * b
        c = c + a
        c = np.sqrt(c)
    return float(c[0])


class ExtractUnit:
    """One simulated 6M image extracted in memory with the benchmark's
    parameters (tasks, context and Bragg widths made once per process, before
    the clock starts)."""

    def __init__(self, expt_path):
        self.expt_path = expt_path
        self.setup = None

    def _prepare(self):
        from dxtbx.model.experiment_list import ExperimentListFactory

        from dials_diffuse import api, bragg
        from dials_diffuse.extraction import context as extraction_context
        from dials_diffuse.extraction import image as extraction_image
        from dials_diffuse.extraction.tasks import plan_tasks

        experiments = ExperimentListFactory.from_json_file(self.expt_path, check_format=True)
        params = api.extraction_params(**{
            "grid.ndiv_h": 4, "grid.ndiv_k": 4, "grid.ndiv_l": 4,
            "masking.bragg.mosaicity_deg": 0.1, "masking.bragg.beam_divergence_deg": 0.03154,
            "output.save_pixels": "off"})
        tasks, _ = plan_tasks(experiments, None)
        widths = bragg.profile_widths(experiments, None, params.masking.bragg)
        for task in tasks:
            task.bragg_widths = widths.get(task.experiment_id)
        context = extraction_context.context_for(tasks[0], params)
        ndiv = (params.grid.ndiv_h, params.grid.ndiv_k, params.grid.ndiv_l)
        self.setup = (extraction_image.extract_image, tasks, context, params, ndiv)

    def __call__(self, index):
        if self.setup is None:
            self._prepare()
        extract_image, tasks, context, params, ndiv = self.setup
        return extract_image(tasks[index % len(tasks)], context, params, ndiv)


def run_units(func, units):
    for u in units:
        func(u)


def timed_split(func, n_units, nproc, warm):
    """Wall seconds for ``n_units`` of ``func`` over ``nproc`` forked
    processes (each warmed by ``warm`` units before the clock starts)."""
    shares = [list(range(k, n_units, nproc)) for k in range(nproc)]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pids = []
    for share in shares:
        pid = os.fork()
        if pid == 0:
            try:
                for u in range(warm):
                    func(u)
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                run_units(func, share)
                os.write(done_w, b"d")
            finally:
                os._exit(0)
        pids.append(pid)
    for _ in shares:
        os.read(ready_r, 1)
    start = time.perf_counter()
    os.write(go_w, b"g" * len(shares))
    for _ in shares:
        os.read(done_r, 1)
    wall = time.perf_counter() - start
    for pid in pids:
        os.waitpid(pid, 0)
    for fd in (ready_r, ready_w, go_r, go_w, done_r, done_w):
        os.close(fd)
    return wall


def measure(name, func, n_units, repeats, warm):
    one, two = [], []
    for _ in range(repeats):  # alternating, so that drifts of the VM hit both
        one.append(timed_split(func, n_units, 1, warm))
        two.append(timed_split(func, n_units, 2, warm))
    t1, t2 = statistics.median(one), statistics.median(two)
    row = {"workload": name, "units": n_units, "one_process_s": [round(t, 3) for t in one],
           "two_processes_s": [round(t, 3) for t in two], "median_one_s": round(t1, 3),
           "median_two_s": round(t2, 3), "gain": round(t1 / t2, 3)}
    print("%-8s %4d units  1 process %7.3f s  2 processes %7.3f s  gain %.2fx"
          % (name, n_units, t1, t2, t1 / t2), flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--units", type=int, default=40)
    parser.add_argument("--extract", action="store_true",
                        help="also time extract_image on bench/data/p6m_rot_100")
    parser.add_argument("--output", default="parallel_ceiling.json")
    args = parser.parse_args(argv)
    os.environ.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    result = dict(common.stamp(), rows=[])
    print(result["uptime"])
    workloads = [("cpu", cpu_unit, 1), ("stream", stream_unit, 1), ("fresh", fresh_unit, 1)]
    if args.extract:
        workloads.append(("extract", ExtractUnit(str(EXPT)), 2))
    for name, func, warm in workloads:
        result["rows"].append(measure(name, func, args.units, args.repeats, warm))
    common.write_result(args.output, result)


if __name__ == "__main__":
    main()

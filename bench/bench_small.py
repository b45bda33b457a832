"""A small before/after timing: extraction and merge (library calls, one
process) of the compare_outputs stills dataset (4 simulated 320 x 320 px
stills, their true models), best of N repeats, wall and CPU seconds.

  python bench/bench_small.py [--data /tmp/diffuse_compare_data/stills] [--repeat 5]

Runs whatever dials_diffuse the Python imports (run it with the old and the
new code on the same machine, interleaved, to compare).
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

from dxtbx.model.experiment_list import ExperimentListFactory

import dials_diffuse
from dials_diffuse.command_line import extract as extract_cmd
from dials_diffuse.command_line import merge as merge_cmd
from dials_diffuse.extraction import extract
from dials_diffuse.merging import merge_run


def timed(func):
    w, c = time.perf_counter(), time.process_time()
    func()
    return time.perf_counter() - w, time.process_time() - c


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="/tmp/diffuse_compare_data/stills")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    models = ExperimentListFactory.from_json_file(os.path.join(args.data, "truth.expt"))
    results = {"extract": [], "merge": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            p = extract_cmd.phil_scope.fetch().extract()
            p.output.directory = os.path.join(tmp, "extracted")
            p.grid.ndiv_h = p.grid.ndiv_k = p.grid.ndiv_l = 2
            p.mp.nproc = 1
            results["extract"].append(timed(lambda: extract(models, p, progress=False)))
            m = merge_cmd.phil_scope.fetch().extract()
            m.output.directory = os.path.join(tmp, "merged")
            m.mp.nproc = 1
            results["merge"].append(timed(lambda: merge_run(models, [p.output.directory], m)))
    commit = subprocess.run(["git", "-C", os.path.dirname(dials_diffuse.__file__), "rev-parse",
                             "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"code": os.path.dirname(dials_diffuse.__file__), "commit": commit,
           "load_before": os.getloadavg()[0]}
    for step, times in results.items():
        out[step] = {"best_wall_s": round(min(t[0] for t in times), 3),
                     "best_cpu_s": round(min(t[1] for t in times), 3),
                     "median_wall_s": round(sorted(t[0] for t in times)[len(times) // 2], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Serial scale (issue 15): 10^4 simulated stills extracted and merged, with
time per still and peak memory against the number of stills.

One simulated serial data set of ``max(--sizes)`` stills (one crystal per
still, P 2_1 2_1 2_1, which has no indexing ambiguity) on a small generic
miniCBF detector (``--pixels`` square, 0.5 mm pixels at 100 mm), then for each
N in ``--sizes`` the first N experiments of ``truth.expt`` are run as a user
would run them:

* ``load``:    ``ExperimentListFactory.from_json_file(check_format=True)`` of
  the N-experiment list in its own process, which is what the argument parser
  of dials.diffuse_extract does before any extraction (its share of the
  extraction wall time is reported);
* ``extract``: ``dials.diffuse_extract subset.expt output.save_pixels=off
  mp.nproc=P``;
* ``merge``:   ``dials.diffuse_merge subset.expt extracted/ mp.nproc=P``
  (and with ``scaling.solver=alternating`` at the sizes in ``--alternating``);
* the merged map against the simulator's truth
  (``dials_diffuse.simulate.compare.compare_with_truth``) and the refined
  per-still scales against the true ones.

Each command is a child process: wall, CPU, the peak RSS summed over its
process tree (psutil, polled every 0.05 s; forked workers' shared pages are
counted once per process, so this overstates) and the largest single
process's high-water mark (``wait4`` rusage). Results go to
``bench/results/serial_10k.json`` after every step, so an interrupted run
keeps what finished. Data go to ``--work`` (default /tmp/serial_10k) and are
deleted at the end unless ``--keep``.

    .venv/bin/python bench/serial_10k.py                       # 1000 3000 10000
    .venv/bin/python bench/serial_10k.py --sizes 100 300 --out serial_10k_smoke.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()

SIM = {
    "mode": "stills",
    "detector.format": "generic",
    "detector.pixel_size": 0.5,
    "detector.distance": 100,
    "crystal.space_group": "P 21 21 21",
    "crystal.stills_per_crystal": 1,
}

LOAD_SNIPPET = """
import sys, time
t0 = time.perf_counter()
from dxtbx.model.experiment_list import ExperimentListFactory
t1 = time.perf_counter()
el = ExperimentListFactory.from_json_file(sys.argv[1], check_format=True)
t2 = time.perf_counter()
print(f"LOAD {len(el)} {t1 - t0:.3f} {t2 - t1:.3f}")
"""


def subset(expt, n, out):
    """The first n experiments of expt (all their models) as a new file."""
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    ExperimentList([experiments[i] for i in range(n)]).as_file(str(out))
    return out


def parse_merge_log(text):
    out = {}
    m = re.search(r"Read ([\d.]+) s, scale and merge ([\d.]+) s, write ([\d.]+) s", text)
    if m:
        out["read_s"], out["scale_merge_s"], out["write_s"] = map(float, m.groups())
    m = re.search(r"Scaling (converged|did not converge)[^\n]*?(\d+) iterations", text)
    if m:
        out["converged"] = m.group(1) == "converged"
        out["iterations"] = int(m.group(2))
    m = re.search(r"^Passes over the observations.*$", text, re.M)
    if m:
        out["passes"] = m.group(0)
    m = re.search(r"Wrote merged map of (\d+) voxels", text)
    if m:
        out["voxels"] = int(m.group(1))
    m = re.search(r"\| all\s+\|\s+\|\s+(\d+)\s+\|\s+([\d.]+)", text)
    if m:
        out["cc_half"] = float(m.group(2))
    return out


def n_observations(merged):
    try:
        d = json.loads((merged / "refined_scaling_model_params.json").read_text())
        return d["refinement_statistics"]["n_observations"], d
    except (OSError, KeyError, ValueError):
        return None, None


def scale_cc(params, truth_scales, n):
    import numpy as np

    if not params:
        return None
    refined = params["refined_parameters"]
    ids = [i for i in range(n) if str(i) in refined]
    b = np.array([refined[str(i)]["multiplicative_scale"] for i in ids])
    t = np.asarray(truth_scales)[ids]
    return float(np.corrcoef(b, t)[0, 1])


def bin_cmd(name):
    return str(common.VENV_BIN / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--alternating", type=int, nargs="*", default=[],
                        help="also merge with scaling.solver=alternating at these sizes")
    parser.add_argument("--pixels", type=int, default=96)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--work", default="/tmp/serial_10k")
    parser.add_argument("--out", default="serial_10k.json")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--save-pixels", default="off",
                        help="output.save_pixels of dials.diffuse_extract (off; False before "
                             "the option became a choice)")
    parser.add_argument("--no-load-check", action="store_true",
                        help="skip the separate check_format load timing")
    args = parser.parse_args()

    sizes = sorted(set(args.sizes))
    work = Path(args.work)
    if work.exists():
        sys.exit(f"{work} exists; remove it or give --work")
    work.mkdir(parents=True)
    result = common.stamp()
    result.update({"benchmark": "serial_10k", "sizes": sizes, "nproc": args.nproc,
                   "simulation": dict(SIM, **{"detector.n_fast": args.pixels,
                                              "detector.n_slow": args.pixels,
                                              "n_images": sizes[-1]}),
                   "runs": []})

    def save():
        common.write_result(args.out, result)

    try:
        # 1. simulate the largest data set once; smaller N are its first N stills
        sim = work / "sim"
        cmd = [bin_cmd("dials.diffuse_simulate"), f"n_images={sizes[-1]}",
               f"detector.n_fast={args.pixels}", f"detector.n_slow={args.pixels}",
               f"output.directory={sim}", f"output.log={work / 'simulate.log'}"]
        cmd += [f"{k}={v}" for k, v in SIM.items()]
        print(f"simulating {sizes[-1]} stills ...", flush=True)
        load = common.loadavg()
        t = common.run_timed(cmd, work, log=work / "simulate.out")
        t.update(load_before=load, per_still_ms=round(1000 * t["wall_s"] / sizes[-1], 2),
                 disk_mb=round(common.dir_size(sim) / 2**20, 1))
        result["simulate"] = t
        print(f"  {t}", flush=True)
        save()

        from dials_diffuse.simulate import load_truth
        from dials_diffuse.simulate.compare import compare_with_truth

        truth = load_truth(sim)
        truth_scales = list(truth.scales)
        del truth

        for n in sizes:
            row = {"n": n}
            result["runs"].append(row)
            expt = sim / "truth.expt" if n == sizes[-1] else subset(
                sim / "truth.expt", n, sim / f"subset_{n}.expt")
            if not args.no_load_check:
                row["load_before_load_check"] = common.loadavg()
                t0 = time.perf_counter()
                out = subprocess.run([str(common.VENV_PY), "-c", LOAD_SNIPPET, str(expt)],
                                     capture_output=True, text=True, env=common.one_core_env(),
                                     check=True).stdout
                m = re.search(r"LOAD (\d+) ([\d.]+) ([\d.]+)", out)
                row["load_check_format"] = {"experiments": int(m.group(1)),
                                            "import_s": float(m.group(2)),
                                            "load_s": float(m.group(3)),
                                            "process_wall_s": round(time.perf_counter() - t0, 3)}
                print(f"N={n} load {row['load_check_format']}", flush=True)

            ext = work / f"extracted_{n}"
            log = work / f"extract_{n}.log"
            row["load_before_extract"] = common.loadavg()
            t = common.run_timed([bin_cmd("dials.diffuse_extract"), str(expt),
                                  f"output.save_pixels={args.save_pixels}", f"mp.nproc={args.nproc}",
                                  f"output.directory={ext}", f"output.log={log}"],
                                 work, log=work / f"extract_{n}.out")
            t.update(common.parse_extract_log(log.read_text()))
            t["per_still_ms"] = round(1000 * t["wall_s"] / n, 2)
            t["disk_mb"] = round(common.dir_size(ext) / 2**20, 1)
            if "load_check_format" in row:
                t["load_share"] = round(row["load_check_format"]["load_s"] / t["wall_s"], 3)
            row["extract"] = t
            print(f"N={n} extract {t}", flush=True)
            save()

            variants = [("merge", [])]
            if n in args.alternating:
                variants.append(("merge_alternating", ["scaling.solver=alternating"]))
            for name, extra in variants:
                merged = work / f"{name}_{n}"
                log = work / f"{name}_{n}.log"
                row[f"load_before_{name}"] = common.loadavg()
                t = common.run_timed([bin_cmd("dials.diffuse_merge"), str(expt), str(ext),
                                      f"mp.nproc={args.nproc}", f"output.directory={merged}",
                                      f"output.log={log}"] + extra,
                                     work, log=work / f"{name}_{n}.out", check=False)
                t.update(parse_merge_log(log.read_text() if log.exists() else ""))
                if t["returncode"] != 0:
                    t["error_tail"] = (work / f"{name}_{n}.out").read_text()[-2000:]
                    row[name] = t
                    print(f"N={n} {name} FAILED {t['returncode']}", flush=True)
                    save()
                    continue
                t["per_still_ms"] = round(1000 * t["wall_s"] / n, 2)
                nobs, params = n_observations(merged)
                t["observations"] = nobs
                t["scale_cc_vs_truth"] = scale_cc(params, truth_scales, n)
                c = compare_with_truth(merged, sim)
                t["cc_vs_truth"] = round(c["cc_all"], 4)
                t["cc_vs_truth_off_bragg"] = round(c["cc_off_bragg"], 4)
                t["shell_ratio"] = [round(r, 4) for r in c["shell_ratio"]]
                row[name] = t
                print(f"N={n} {name} {t}", flush=True)
                save()
                if not args.keep:
                    shutil.rmtree(merged, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(ext, ignore_errors=True)

        # slopes between the smallest and largest N
        runs = [r for r in result["runs"] if "extract" in r and r.get("merge", {}).get("returncode") == 0]
        if len(runs) >= 2:
            a, b = runs[0], runs[-1]
            dn = b["n"] - a["n"]
            result["slopes_per_still"] = {
                f"{step}_{key}_kb": round(1024 * (b[step][key] - a[step][key]) / dn, 2)
                for step in ("extract", "merge") for key in ("maxrss_mb", "peak_rss_tree_mb")}
            result["slopes_per_still"].update({
                f"{step}_wall_ms": round(1000 * (b[step]["wall_s"] - a[step]["wall_s"]) / dn, 2)
                for step in ("extract", "merge")})
        save()
    except BaseException:
        print(f"failed: the data are kept in {work}", flush=True)
        raise
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

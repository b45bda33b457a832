"""Behaviour-unchanged check: run the whole job on small simulated datasets with
fixed seeds, or compare two output trees file by file.

  python bench/compare_outputs.py run DEST [--data DIR] [--only stills|rotation]
  python bench/compare_outputs.py compare BASELINE NEW

``run`` simulates (once, into --data, default /tmp/diffuse_compare_data, so
the experiment files of both runs name the same image paths) 4 stills and 10
rotation images, then runs ``dials.diffuse_process`` (DIALS phase 1,
extraction with masks, diagnostics, scaling and merging) on each with the
Python running this script, into DEST/stills and DEST/rotation. Run it once
with the old code and once with the new, then ``compare`` the two trees.

``compare`` reports, per file: ``bytes`` (byte-identical), ``numeric``
(npz: same array names, dtypes, shapes and values, NaN equal to NaN; json:
equal after parsing; pickles and DIALS .expt/.refl compared after loading),
``differs`` (with the first differing keys) or ``missing``. Files whose
content is expected to change between runs (logs with timestamps and wall
times, HTML reports that embed them, timing fields) are listed separately as
``volatile`` and compared with those lines/keys removed. Exit status 1 if any
non-volatile file differs or is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import INDEXABLE_STILLS_PARAMS  # noqa: E402

#: simulated stills that index reliably (the dataset of tests/test_process.py)
STILLS = INDEXABLE_STILLS_PARAMS
ROTATION = {**{k: v for k, v in STILLS.items() if k != "bragg.mosaicity_deg"},
            "mode": "rotation", "n_images": 10, "random_seed": 12,
            "rotation.oscillation": 0.5}
COMMON_ARGS = [
    "indexing.known_symmetry.space_group=P212121",
    "indexing.known_symmetry.unit_cell=50,60,70,90,90,90",
    "grid.ndiv_h=2", "grid.ndiv_k=2", "grid.ndiv_l=2",
    "check.max_plot_points=5000", "masking.bragg.max_delpsi=0.9", "mp.nproc=2",
]
DATASETS = {
    "stills": (STILLS, COMMON_ARGS),
    "rotation": (ROTATION, COMMON_ARGS + ["indexing.method=fft1d"]),
}

#: keys whose values are wall-clock times, dates, host or absolute paths;
#: ``signatures`` hash the experiment identifiers, which DIALS draws at random
#: (uuid) in every run; ``bytes``: sizes of the logs and reports
VOLATILE_KEY = re.compile(r"(time|seconds|elapsed|date|host|wall|duration|started|finished|_s$"
                          r"|^signatures$|^identifier$|^bytes$)", re.I)
#: log/html/txt lines with timestamps, timings, absolute paths, the step table
#: of the summary (seconds column) or experiment identifiers (random uuids)
VOLATILE_LINE = re.compile(r"(\d\d:\d\d:\d\d|\d+(\.\d+)? ?s\b|seconds|Time|time|/tmp/|/work/"
                           r"|^\| \w+ +\| [\w ]+\| +[\d.]+ +\|$|identifier)")


def simulate(data_dir: Path, name: str) -> Path:
    from dials_diffuse.simulate import params_from, simulate_dataset

    directory = data_dir / name
    if (directory / "truth.json").exists():
        return directory
    params = {**DATASETS[name][0], "output.directory": str(directory)}
    return Path(simulate_dataset(params_from(**params)))


def run(dest: Path, data_dir: Path, only=None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, (_, args) in DATASETS.items():
        if only and name != only:
            continue
        images = sorted(simulate(data_dir, name).glob("image_*.cbf"))
        work = dest / name
        work.mkdir(exist_ok=True)
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "dials_diffuse.command_line.process", *map(str, images),
             "output.base_dir=run", *args],
            cwd=work, capture_output=True, text=True)
        (work / "stdout.txt").write_text(proc.stdout)
        (work / "stderr.txt").write_text(proc.stderr)
        print(f"{name}: exit {proc.returncode} in {time.time() - t0:.1f} s -> {work}")
        if proc.returncode:
            print(proc.stderr[-3000:])
            sys.exit(proc.returncode)


# --------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------
def _json_diff(a, b, path="", volatile=False, out=None):
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if volatile and VOLATILE_KEY.search(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'new' if k in b else 'baseline'}")
            else:
                _json_diff(a[k], b[k], f"{path}/{k}", volatile, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _json_diff(x, y, f"{path}[{i}]", volatile, out)
    elif isinstance(a, str) and isinstance(b, str) and volatile:
        if _strip_text(a) != _strip_text(b):
            out.append(f"{path}: {a[:60]!r} != {b[:60]!r}")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
        out.append(f"{path}: {str(a)[:60]} != {str(b)[:60]}")
    return out


def _strip_text(text: str) -> list:
    return [line for line in text.splitlines() if not VOLATILE_LINE.search(line)]


def _npz_diff(a: Path, b: Path) -> list:
    out = []
    with np.load(a, allow_pickle=True) as x, np.load(b, allow_pickle=True) as y:
        for k in sorted(set(x.files) | set(y.files)):
            if k not in x.files or k not in y.files:
                out.append(f"{k}: only in {'new' if k in y.files else 'baseline'}")
                continue
            u, v = x[k], y[k]
            if u.dtype != v.dtype or u.shape != v.shape:
                out.append(f"{k}: {u.dtype}{u.shape} != {v.dtype}{v.shape}")
            elif not np.array_equal(u, v, equal_nan=u.dtype.kind in "fc"):
                out.append(f"{k}: values differ")
    return out


def _dials_diff(a: Path, b: Path) -> list:
    if a.suffix == ".expt":
        from dxtbx.model.experiment_list import ExperimentListFactory

        x = ExperimentListFactory.from_json_file(str(a), check_format=False)
        y = ExperimentListFactory.from_json_file(str(b), check_format=False)
        out = []
        for i, (e, f) in enumerate(zip(x, y)):
            if (e.crystal is None) != (f.crystal is None) or (
                e.crystal is not None and e.crystal != f.crystal):
                out.append(f"experiment {i}: crystal differs")
            if e.detector != f.detector or e.beam != f.beam:
                out.append(f"experiment {i}: detector/beam differs")
        return out + ([] if len(x) == len(y) else [f"{len(x)} != {len(y)} experiments"])
    from dials.array_family import flex

    x, y = flex.reflection_table.from_file(str(a)), flex.reflection_table.from_file(str(b))
    if len(x) != len(y) or sorted(x.keys()) != sorted(y.keys()):
        return [f"{len(x)} rows {sorted(x.keys())} != {len(y)} rows {sorted(y.keys())}"]
    out = []
    for k in sorted(x.keys()):
        try:
            if list(x[k]) != list(y[k]):
                out.append(f"column {k} differs")
        except Exception:  # shoebox columns etc.: not comparable element-wise
            pass
    return out


def is_volatile(rel: str) -> bool:
    return rel.endswith((".log", ".html", ".txt"))


def compare_file(a: Path, b: Path, rel: str):
    if a.read_bytes() == b.read_bytes():
        return "bytes", []
    volatile = is_volatile(rel)
    try:
        if a.suffix == ".npz":
            diff = _npz_diff(a, b)
        elif a.suffix == ".json":
            diff = _json_diff(json.loads(a.read_text()), json.loads(b.read_text()),
                              volatile=True)
            volatile = volatile or not _json_diff(json.loads(a.read_text()),
                                                  json.loads(b.read_text())) == diff
        elif a.suffix in (".expt", ".refl"):
            diff = _dials_diff(a, b)
        elif a.suffix in (".log", ".html", ".txt", ".phil", ".md"):
            x, y = _strip_text(a.read_text(errors="replace")), _strip_text(b.read_text(errors="replace"))
            diff = [] if x == y else [f"{sum(p != q for p, q in zip(x, y)) + abs(len(x) - len(y))} lines differ"]
        else:
            diff = ["bytes differ"]
    except Exception as exc:  # noqa: BLE001 - report, do not stop the comparison
        diff = [f"could not compare: {exc!r}"]
    if diff:
        return ("volatile-differs" if volatile else "differs"), diff
    return ("volatile-equal" if volatile else "numeric"), []


def compare(base: Path, new: Path) -> int:
    files = sorted({str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}
                   | {str(p.relative_to(new)) for p in new.rglob("*") if p.is_file()})
    counts, bad = {}, 0
    for rel in files:
        a, b = base / rel, new / rel
        if not a.exists() or not b.exists():
            status, diff = "missing", [f"only in {'new' if b.exists() else 'baseline'}"]
        else:
            status, diff = compare_file(a, b, rel)
        counts[status] = counts.get(status, 0) + 1
        if status != "bytes":
            print(f"{status:17s} {rel}" + (f"  {'; '.join(diff[:4])}" if diff else ""))
        if status in ("differs", "missing"):
            bad += 1
    print(f"{len(files)} files: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("RESULT:", "identical" if not bad else f"{bad} files differ or are missing")
    return 1 if bad else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("dest", type=Path)
    r.add_argument("--data", type=Path, default=Path("/tmp/diffuse_compare_data"))
    r.add_argument("--only", choices=sorted(DATASETS))
    c = sub.add_parser("compare")
    c.add_argument("baseline", type=Path)
    c.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run(args.dest.resolve(), args.data.resolve(), args.only)
        return 0
    return compare(args.baseline, args.new)


if __name__ == "__main__":
    os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")
    sys.exit(main())

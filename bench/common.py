"""Shared helpers of the benchmark scripts: machine description, load, the
simulated Pilatus 6M datasets, timing of child processes with peak memory.

Nothing here is part of dials_diffuse; the scripts import it as a sibling
module (``bench/`` is put on ``sys.path`` by each script).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "data"  # gitignored: simulated images and run outputs
RESULTS = BENCH / "results"  # small JSON results, committed
VENV_PY = ROOT / ".venv" / "bin" / "python"
VENV_BIN = ROOT / ".venv" / "bin"
LIBTBX_BUILD = "/usr/lib/cctbx/python3.11"

# Pilatus 6M: 2463 x 2527 pixels of 172 um; rotation at 250 mm
P6M = {
    "detector.n_fast": 2463,
    "detector.n_slow": 2527,
    "detector.pixel_size": 0.172,
    "detector.distance": 250,
    "detector.format": "pilatus",
    "mode": "rotation",
    "rotation.oscillation": 0.1,
}


def one_core_env(env=None):
    """Environment that keeps numpy/BLAS to one thread (a 'one core' run)."""
    env = dict(os.environ if env is None else env)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[k] = "1"
    env.setdefault("LIBTBX_BUILD", LIBTBX_BUILD)
    return env


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def uptime_line():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(map(str, loadavg()))


def machine():
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    import numpy

    try:
        import dials

        dials_version = getattr(dials, "__version__", None)
    except Exception:
        dials_version = None
    if dials_version is None:
        try:
            from dials.util.version import dials_version as dv

            dials_version = dv()
        except Exception:
            dials_version = "unknown"
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "dials": str(dials_version),
        "kernel": platform.release(),
    }


def stamp():
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_before": loadavg(),
        "uptime": uptime_line(),
        "machine": machine(),
        "git_commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True,
        ).stdout.strip(),
    }


def median(values):
    return float(statistics.median(values)) if values else float("nan")


def write_result(name, data):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    data = dict(data)
    data["load_after"] = loadavg()
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def table(rows, headers):
    """Plain text table (no dependency)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def _numeric(s):
    try:
        float(s.replace("x", "").replace("%", ""))
        return True
    except ValueError:
        return False


def bootstrap():
    """The project's own installer (idempotent, silent when all is there)."""
    if not VENV_PY.exists() or not (VENV_BIN / "dials.diffuse_extract").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh")], check=True)


def dataset(n_images, name=None, exact=False):
    """A simulated Pilatus 6M rotation dataset with at least (exact: exactly)
    ``n_images`` images under bench/data; simulated once and reused."""
    DATA.mkdir(parents=True, exist_ok=True)
    if not exact:
        for d in sorted(DATA.glob("p6m_rot_*")):
            m = re.fullmatch(r"p6m_rot_(\d+)", d.name)
            if m and int(m.group(1)) >= n_images and (d / "truth.json").exists():
                return d
    d = DATA / (name or f"p6m_rot_{n_images}")
    if (d / "truth.json").exists():
        return d
    args = [str(VENV_BIN / "dials.diffuse_simulate"), f"n_images={n_images}",
            f"output.directory={d}", "output.overwrite=True"]
    args += [f"{k}={v}" for k, v in P6M.items()]
    print(f"simulating {n_images} Pilatus 6M images into {d.relative_to(ROOT)} ...", flush=True)
    t0 = time.time()
    subprocess.run(args, check=True, cwd=str(DATA), stdout=subprocess.DEVNULL,
                   env=one_core_env())
    print(f"  simulated in {time.time() - t0:.0f} s", flush=True)
    return d


class TreeMonitor:
    """Polls the resident memory of a process and all its children (psutil)."""

    def __init__(self, pid, interval=0.05):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    self.peak_single = max(self.peak_single, rss)
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_timed(args, cwd, log=None, env=None, check=True):
    """Run a command; wall time, peak RSS of the process tree (psutil polling,
    summed over concurrent processes) and the largest single-process high-water
    mark (GNU time's maxrss of the children, via os.wait4)."""
    env = one_core_env(env)
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(args, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT, env=env)
        mon = TreeMonitor(proc.pid)
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        mon.stop()
    wall = time.perf_counter() - t0
    if check and proc.returncode != 0:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{tail}")
    return {
        "wall_s": round(wall, 3),
        "user_s": round(rusage.ru_utime, 3),
        "sys_s": round(rusage.ru_stime, 3),
        "peak_rss_tree_mb": round(mon.peak / 2**20, 1),
        "maxrss_mb": round(max(rusage.ru_maxrss / 1024, mon.peak_single / 2**20), 1),
        "returncode": proc.returncode,
    }


def parse_extract_log(text):
    """Timings of a dials.diffuse_extract log: the dynamic pass, the
    extraction loop (and its per-image mean) and the images extracted of
    those planned; keys only for the lines found."""
    out = {}
    m = re.search(r"Dynamic mask from \d+ (?:of \d+ )?images in ([\d.]+) s", text)
    if m:
        out["dynamic_mask_s"] = float(m.group(1))
    m = re.search(r"Extracted (\d+) images in ([\d.]+) s \(([\d.]+) s per image", text)
    if m:
        out["images_extracted"] = int(m.group(1))
        out["extraction_loop_s"] = float(m.group(2))
        out["per_image_s"] = float(m.group(3))
    m = re.search(r"Extracted (\d+) of (\d+) images", text)
    if m:
        out["extracted_of"] = [int(m.group(1)), int(m.group(2))]
    return out


def dir_size(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)


def add_repo_to_path():
    for p in (str(BENCH), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)

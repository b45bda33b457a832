"""Parallel extraction (forked processes, Dask) gives the serial result exactly."""

from __future__ import annotations

import filecmp
import json

import pytest

from dials_diffuse.extraction import extract
from dials_diffuse.simulate import load_truth

from diffuse_helpers import extraction_params


def extracted_files(directory):
    return sorted(p.name for p in directory.glob("image_*.npz"))


def without_timing(manifest):
    for entry in manifest["images"]:
        entry.pop("seconds", None)
    return manifest


@pytest.fixture(scope="module")
def serial(simulated_stills, tmp_path_factory):
    truth = load_truth(simulated_stills)
    out = tmp_path_factory.mktemp("serial") / "out"
    manifest = extract(truth.experiments, extraction_params(truth, out, **{"mp.nproc": 1}))
    return truth, out, manifest


@pytest.mark.parametrize("method", ["multiprocessing", "dask"])
def test_parallel_equals_serial(serial, tmp_path, method):
    pytest.importorskip("dask.distributed")
    truth, serial_out, serial_manifest = serial
    out = tmp_path / "out"
    manifest = extract(
        truth.experiments,
        extraction_params(truth, out, **{"mp.nproc": 2, "mp.method": method}),
    )
    names = extracted_files(serial_out)
    assert names and names == extracted_files(out)
    for name in names:
        assert filecmp.cmp(serial_out / name, out / name, shallow=False), name
    assert without_timing(manifest) == without_timing(json.loads(json.dumps(serial_manifest)))


def test_parallel_merge_read_equals_serial(serial, tmp_path):
    """Reading and ASU mapping in 2 processes gives byte-identical merge outputs."""
    from dials_diffuse.command_line import merge as merge_command
    from dials_diffuse.merging import merge_run

    truth, serial_out, _ = serial
    outputs = {}
    for nproc in (1, 2):
        params = merge_command.phil_scope.fetch().extract()
        params.mp.nproc = nproc
        params.output.directory = str(tmp_path / f"m{nproc}")
        merge_run(truth.experiments, [str(serial_out)], params)
        outputs[nproc] = tmp_path / f"m{nproc}"
    names = sorted(p.name for p in outputs[1].iterdir())
    assert "voxel_data_relative.npz" in names
    for name in names:
        assert filecmp.cmp(outputs[1] / name, outputs[2] / name, shallow=False), name


def _pid_and_square(shared, task):
    import os

    return os.getpid(), task * task + shared


@pytest.mark.parametrize("nproc", [1, 2])
def test_fork_map_while_waiting(nproc):
    """fork_map's while_waiting runs once, in this process, and the results
    are the tasks' in order whatever it does (here: a module import, as the
    merge loads its compiled sweeps while the files are read)."""
    import os

    from dials_diffuse.parallel import fork_map

    calls = []

    def while_waiting():
        import numpy  # noqa: F401  an import in this process while workers run

        calls.append(os.getpid())

    results = fork_map(_pid_and_square, range(6), nproc, shared=1, while_waiting=while_waiting)
    assert [r for _, r in results] == [t * t + 1 for t in range(6)]
    assert calls == [os.getpid()]
    workers = {pid for pid, _ in results}
    assert (workers == {os.getpid()}) if nproc == 1 else (os.getpid() not in workers)


def _killed_at_two(shared, task):
    import os
    import signal

    if task == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the system's out-of-memory killer would
    return task


def test_a_killed_worker_ends_the_map_with_a_sorry():
    """A worker killed by the system (SIGKILL, no Python exception) ends the
    map with one Sorry line naming mp.nproc, not a BrokenProcessPool
    traceback or a hang."""
    from dials.util import Sorry

    from dials_diffuse.parallel import fork_map

    with pytest.raises(Sorry, match=r"mp.nproc=2\) ended abruptly.*smaller mp.nproc") as e:
        fork_map(_killed_at_two, range(6), 2)
    assert "\n" not in str(e.value)

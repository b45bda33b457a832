"""Atomic file writing shared by every command.

Each output is written to a unique temporary name in its destination directory
and renamed into place only when complete, so an interrupted run never leaves a
file that could be mistaken for a result, and concurrent runs never share a
temporary path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import tempfile
import threading
from typing import Any

import numpy as np

from dials.util import Sorry
import zipfile
from dxtbx import flumpy


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask. Reading it means setting it, so two threads
    (the merge writes its maps in threads) could each read the other's
    temporary 0 and leave it set: the two calls are made under a lock."""
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    # keep the extension: some writers (ExperimentList.as_file) choose by it;
    # host and pid name the writer, so that a later run can tell a part file
    # left by a killed process from one still being written
    suffix = ".part" + os.path.splitext(base)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.{_HOST}-{os.getpid()}.", suffix=suffix,
                                   dir=directory)
    except OSError as e:
        raise Sorry(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the permissions of a normal file
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            # disk full, file size limit (EFBIG), I/O error: one line, no partial file
            raise Sorry(f"cannot write {path}: {e.strerror or e}") from e
        raise


def _host() -> str:
    return socket.gethostname().replace(".", "_")


# the pid is read at each write: a forked worker's part files carry its own
# (a killed worker's are then stale while the parent still runs)
_HOST = _host()


def remove_stale_parts(directory: str) -> int:
    """Delete temporary files of ``atomic_path`` in ``directory`` whose writer
    was a process of this host that no longer exists (killed mid-write).
    Returns how many were removed."""
    host = _HOST
    pattern = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.part(\.[^.]*)?$")
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        m = pattern.match(name)
        if not m or m.group("host") != host or _process_exists(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_completion_marker(path: str) -> None:
    """Delete an earlier run's completion marker before anything new is
    written, so an interrupted rerun never looks complete; Sorry if it stays."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise Sorry(f"cannot replace {path}: {e.strerror}")


def write_json(path: str, data: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")


def write_npz(path: str, compress_level: int = 6, deflate_floats: bool = True,
              stored=(), **arrays) -> None:
    """An .npz that ``np.load`` reads; ``compress_level`` 0 stores, 1 is fast
    deflate, 9 smallest. ``deflate_floats=False`` stores floating-point arrays
    uncompressed (deflate gains little on noisy floats and costs the most);
    the arrays named in ``stored`` are stored uncompressed too."""

    # ZipInfo's level is private before Python 3.13
    level_slot = (
        "compress_level" if "compress_level" in zipfile.ZipInfo.__slots__ else "_compresslevel"
    )
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for name, value in arrays.items():
                value = np.asanyarray(value)
                deflate = compress_level > 0 and name not in stored and (
                    deflate_floats or value.dtype.kind not in "fc"
                )
                # a fixed timestamp: the same arrays give the same bytes
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
                if deflate:
                    setattr(info, level_slot, compress_level)
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, value, allow_pickle=False)


def write_pickle(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


class _FlexBoolPickle:
    """Pickles as the flex.bool of a numpy bool array, byte for byte what
    flex.bool's own pickle writes (tested), but made by numpy: flex builds
    its state a character at a time (0.32 s for one Pilatus 6M mask, with
    the GIL held while the extraction workers wait for their next image)."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array, dtype=bool)

    def __reduce__(self):
        from scitbx.array_family import flex

        n = self.array.size
        # flex's state: the element count (a byte holding its own length + 1,
        # then the count little-endian; 0 alone for none), then '1' or '0'
        # per element
        count = n.to_bytes((n.bit_length() + 7) // 8, "little")
        header = bytes([len(count) + 1]) + count if n else b"\x00"
        chars = np.where(self.array.reshape(-1), np.uint8(ord("1")), np.uint8(ord("0")))
        return flex.bool, (), (flex.grid(*self.array.shape), header + chars.tobytes())


def write_mask_pickle(path: str, panel_masks) -> None:
    """Per-panel bool masks (numpy) as the pickled tuple of flex.bool that
    DIALS reads (``dials.image_viewer mask=``, ``lookup.mask``)."""
    write_pickle(path, tuple(_FlexBoolPickle(m) for m in panel_masks))


def write_experiments(path: str, experiments) -> None:
    with atomic_path(path) as tmp:
        experiments.as_file(tmp)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_background_map(path: str):
    """Background per panel as float64 arrays (slow, fast): a .npy of shape
    (slow, fast) or (panel, slow, fast), or a pickle of per-panel arrays.
    Sorry unless readable, 2-D per panel and finite."""



    try:
        if path.lower().endswith(".npy"):
            data = np.load(path, allow_pickle=False)
            panels = [data] if data.ndim == 2 else list(data)
        else:
            with open(path, "rb") as fh:
                obj = pickle.load(fh)
            objs = obj if isinstance(obj, (tuple, list)) else [obj]
            panels = [p if isinstance(p, np.ndarray) else flumpy.to_numpy(p) for p in objs]
    except Exception as e:
        raise Sorry(f"background map {path} cannot be read: {e}")
    panels = [np.asarray(p, dtype=np.float64) for p in panels]
    if any(p.ndim != 2 for p in panels):
        raise Sorry(f"background map {path} is not 2-D per panel")
    if not all(np.all(np.isfinite(p)) for p in panels):
        raise Sorry(f"background map {path} contains NaN or infinite values")
    return panels

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
import tempfile
from typing import Any

import numpy as np

from dials.util import Sorry


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    # keep the extension: some writers (ExperimentList.as_file) choose by it
    suffix = ".part" + os.path.splitext(base)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix, dir=directory)
    except OSError as e:
        raise Sorry(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the permissions of a normal file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            # disk full, file size limit (EFBIG), I/O error: one line, no partial file
            raise Sorry(f"cannot write {path}: {e.strerror or e}") from e
        raise


def write_json(path: str, data: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")


def write_npz(path: str, compress_level: int = 6, **arrays) -> None:
    """An .npz that ``np.load`` reads; ``compress_level`` 0 stores, 1 is fast
    deflate, 9 smallest."""
    import zipfile

    method = zipfile.ZIP_STORED if compress_level == 0 else zipfile.ZIP_DEFLATED
    with atomic_path(path) as tmp:
        kwargs = {} if compress_level == 0 else {"compresslevel": compress_level}
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True, **kwargs) as zf:
            for name, value in arrays.items():
                # a fixed timestamp: the same arrays give the same bytes
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                if compress_level:
                    # ZipInfo's level is private before Python 3.13
                    level_slot = (
                        "compress_level" if "compress_level" in zipfile.ZipInfo.__slots__
                        else "_compresslevel"
                    )
                    setattr(info, level_slot, compress_level)
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def write_pickle(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def write_experiments(path: str, experiments) -> None:
    with atomic_path(path) as tmp:
        experiments.as_file(tmp)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")

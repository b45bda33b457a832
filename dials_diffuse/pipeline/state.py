"""The state of one ``dials.diffuse_process`` run.

:class:`RunState` holds the parameters, the checked inputs, the DIALS
arguments the user gave, the previous run's summary (for reuse) and the
summary this run writes (``dials.diffuse_process.json``). The phases receive it
explicitly and change the summary only through its methods, each of which
names what it records; :attr:`RunState.summary` is a copy for reading.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import platform
from pathlib import Path

from dials_diffuse import io

logger = logging.getLogger("dials.diffuse_process")

#: the run's summary, written by :meth:`RunState.save`
SUMMARY_NAME = "dials.diffuse_process.json"

#: top-level summary entries recorded with :meth:`RunState.record`
SECTIONS = ("n_indexed", "phase1", "validation", "merge", "error", "seconds_total")


def signature(*parts) -> str:
    """A short hash of a step's inputs and parameters (reuse by signature)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def models_fingerprint(experiments) -> str:
    """A short hash of what the later steps take from crystal models: each
    model's identifier, setting (A, at every scan point too), space group and
    images. Identifiers alone do not tell models apart when they are empty
    or when validation keeps another set of models of the same run."""
    parts = []
    for expt in experiments:
        crystal, imageset = expt.crystal, expt.imageset
        matrices = [crystal.get_A()]
        matrices += [crystal.get_A_at_scan_point(i) for i in range(crystal.num_scan_points)]
        images = None
        if imageset is not None and len(imageset):
            # first and last image and their count, O(1) per model; for a
            # container file (one reader for many images) also where they
            # start in it. An image set's own indices are not used for files
            # of one image: they count within the set, which slicing and
            # writing the experiments renumber
            n = len(imageset)
            in_file = 0
            if hasattr(imageset, "data") and imageset.data().has_single_file_reader():
                in_file = int(imageset.indices()[0])
            images = [imageset.get_path(0), imageset.get_path(n - 1), n, in_file]
        # A to 10 digits: written and read again, a crystal's A differs in
        # its last bits (the file holds the real-space axes)
        parts.append([expt.identifier, [[f"{x:.10g}" for x in m] for m in matrices],
                      crystal.get_space_group().type().hall_symbol(), images])
    return signature(parts)


def rel(base, path) -> str:
    """``path`` relative to ``base`` when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


class RunState:
    """Summary, previous summary and reuse decisions of one run."""

    def __init__(self, params, inputs, dials_args=()):
        self.params = params
        self.inputs = inputs
        #: DIALS parameters the user set explicitly (PHIL scopes), applied last
        self.dials_args = tuple(dials_args)
        self.base = Path(params.output.base_dir)
        self.previous = {}
        summary_path = self.base / SUMMARY_NAME
        if summary_path.is_file() and not params.output.overwrite:
            try:
                self.previous = json.loads(summary_path.read_text())
            except (OSError, ValueError):
                self.previous = {}
        self._summary = {
            "command": "dials.diffuse_process",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "base_dir": str(self.base.resolve()),
            "mode": inputs.mode,
            "n_images": len(inputs.image_paths),
            "images": [
                {"image": i, "path": p, "status": "imported"}
                for i, p in enumerate(inputs.image_paths)
            ],
            "steps": {},
            "signatures": {},
            "failures": [],
        }

    # ---- reading ---------------------------------------------------------
    @property
    def summary(self) -> dict:
        """A copy of the summary so far."""
        return copy.deepcopy(self._summary)

    @property
    def n_images(self) -> int:
        return len(self._summary["images"])

    def signature_of(self, step):
        return self._summary["signatures"].get(step)

    def reusable(self, step, signature, *markers) -> bool:
        """True if the previous run finished ``step`` with the same signature
        and every marker file exists (never with ``overwrite=True``)."""
        if self.params.output.overwrite:
            return False
        prev = self.previous.get("signatures", {}).get(step)
        if prev != signature:
            if prev is not None:
                logger.info("%s: inputs or parameters changed since the last run: redoing", step)
            return False
        return all(Path(m).exists() for m in markers)

    # ---- recording -------------------------------------------------------
    def step(self, name, status, seconds=0.0, **info):
        entry = {"status": status, "seconds": round(seconds, 2)}
        entry.update(info)
        self._summary["steps"][name] = entry
        logger.info("Step %s: %s%s", name, status, f" ({seconds:.1f} s)" if seconds else "")

    def record(self, section, value):
        """Set a top-level summary entry (one of :data:`SECTIONS`)."""
        if section not in SECTIONS:
            raise KeyError(f"not a summary section: {section}")
        self._summary[section] = value

    def record_signature(self, step, signature):
        self._summary["signatures"][step] = signature

    def _entry(self, path):
        real = os.path.realpath(path)
        for e in self._summary["images"]:
            if os.path.realpath(e["path"]) == real:
                return e
        return None

    def update_image(self, path=None, index=None, **fields):
        """Set fields of an image's entry, found by path (else by index)."""
        entry = self._entry(path) if path is not None else None
        if entry is None and index is not None:
            entry = self._summary["images"][index]
        if entry is not None:
            entry.update(fields)

    def set_spot_counts(self, counts):
        for e, n in zip(self._summary["images"], counts):
            e["n_spots"] = n

    def set_unit_cells(self, cell_of_experiment):
        """``unit_cell`` of every image with an experiment id."""
        for e in self._summary["images"]:
            if e.get("experiment_id") is not None:
                e["unit_cell"] = cell_of_experiment(e["experiment_id"])

    def mark_all_indexed(self, experiment_id):
        for e in self._summary["images"]:
            e["status"] = "indexed"
            e["experiment_id"] = experiment_id

    def fail_image(self, path, stage, reason):
        e = self._entry(path)
        if e is not None:
            e["status"] = f"failed_{stage}"
            e["reason"] = reason
        self._summary["failures"].append(
            {"image": os.path.basename(path), "path": path, "stage": stage, "reason": reason}
        )

    def record_extracted(self, manifest, file_of):
        """Per-image status from an extraction manifest (``file_of(entry)``:
        the file's path relative to the base directory)."""
        # entries by path once (a scan of the summary per image was quadratic)
        by_path = {}
        for e in self._summary["images"]:
            by_path.setdefault(os.path.realpath(e["path"]), e)
        for entry in manifest["images"]:
            e = by_path.get(os.path.realpath(entry["image_path"]))
            if e is None:
                continue
            if entry["status"] == "extracted":
                e["status"] = "extracted"
                e["extraction_file"] = file_of(entry)
                e["pixels_kept"] = entry.get("pixel_counts", {}).get("kept")
            elif not e["status"].startswith("failed_"):
                self.fail_image(entry["image_path"], "extraction", entry.get("reason", "skipped"))

    def restore_phase1(self, signature):
        """Take phase 1's results from the previous run (reused): image
        entries, indexing failures, phase1 and step entries."""
        prev = self.previous
        s = self._summary
        s["images"] = prev.get("images", s["images"])
        # indexing failures stand; later stages are redone or reused below
        s["failures"] = [f for f in prev.get("failures", []) if f.get("stage") == "indexing"]
        for e in s["images"]:
            if e.get("status") != "failed_indexing" and e.get("status") != "imported":
                e["status"] = "indexed"
                for key in ("reason", "extraction_file", "pixels_kept"):
                    e.pop(key, None)
        s["n_indexed"] = prev.get("n_indexed")
        s["phase1"] = prev.get("phase1", {})
        for name in ("import", "find_spots", "index", "refine"):
            if name in prev.get("steps", {}):
                entry = dict(prev["steps"][name])
                entry["status"] = "reused"
                s["steps"][name] = entry
        s["signatures"]["phase1"] = signature

    def finish(self):
        images = self._summary["images"]
        self._summary["n_extracted"] = sum(e.get("status") == "extracted" for e in images)
        self._summary["n_failed"] = sum(
            str(e.get("status", "")).startswith("failed_") for e in images)
        self._summary["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.save()

    def save(self):
        self._summary["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        io.write_json(str(self.base / SUMMARY_NAME), self._summary)

"""The end of a run: the intermediate-outputs manifest (every file in the
base directory) and the per-image and step tables in the log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dials.util import tabulate

from dials_diffuse import io
from dials_diffuse.pipeline.state import RunState, rel

logger = logging.getLogger("dials.diffuse_process")

#: written by :func:`write_intermediate_manifest`
INTERMEDIATE_MANIFEST_NAME = "intermediate_outputs_manifest.json"


def finish(run: RunState) -> dict:
    """Close the summary, list the files, log the per-image and step tables;
    returns the final summary."""
    run.finish()
    summary = run.summary
    if run.params.output.save_intermediate_outputs:
        write_intermediate_manifest(run.base, summary)
    log_summary(summary)
    return summary


def write_intermediate_manifest(base, summary):
    """List every file under base_dir (path, bytes) grouped by directory."""
    base = Path(base)
    files = []
    for root, dirs, names in os.walk(base):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue  # temporary files of atomic writes
            p = Path(root) / name
            if p.name == INTERMEDIATE_MANIFEST_NAME:
                continue
            files.append({"path": rel(base, p), "bytes": p.stat().st_size})
    manifest = {
        "format": "dials_diffuse.process_outputs/1",
        "base_dir": str(base.resolve()),
        "n_files": len(files),
        "steps": {k: v.get("status") for k, v in summary.get("steps", {}).items()},
        "files": files,
    }
    io.write_json(str(base / INTERMEDIATE_MANIFEST_NAME), manifest)
    return manifest


def log_summary(summary):
    rows = [("image", "status", "spots", "indexed", "cell a, b, c", "reason")]
    for e in summary["images"]:
        cell = e.get("unit_cell") or e.get("unit_cell_indexed")
        rows.append((
            os.path.basename(e["path"]), e.get("status", ""), str(e.get("n_spots", "")),
            str(e.get("n_indexed", "")),
            ", ".join(f"{x:.2f}" for x in cell[:3]) if cell else "",
            (e.get("reason") or "")[:70],
        ))
    logger.info("\nPer-image summary\n%s", tabulate(rows, headers="firstrow"))
    steps = [("step", "status", "seconds")]
    for name, s in summary["steps"].items():
        steps.append((name, s["status"], f"{s.get('seconds', 0):.1f}"))
    logger.info("\nSteps\n%s", tabulate(steps, headers="firstrow"))
    cc = summary.get("merge", {}).get("cc_half_overall")
    if cc:
        logger.info("CC1/2 overall: %s", ", ".join(
            f"{k} {v:.3f}" for k, v in cc.items() if isinstance(v, (int, float))))
    if summary["failures"]:
        logger.info("%d image(s) left out:", len(summary["failures"]))
        for f in summary["failures"]:
            logger.info("  %s (%s): %s", f["image"], f["stage"], f["reason"])


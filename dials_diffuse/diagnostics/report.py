"""The one-page report of a dials.diffuse_check run: every summary as <pre> and
every PNG embedded as base64, so the page reads offline and can be mailed."""

from __future__ import annotations

import base64
import datetime
import html
import logging
import os

from dials_diffuse.diagnostics.plotting import Inventory, write_text

logger = logging.getLogger("dials.diffuse_check")

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; border: 1px solid #ddd; }
nav li { font-size: 0.9em; } .skipped { color: #a33; } .fname { color: #666; font-size: 0.85em; }
"""


def _anchor(name):
    return "f-" + "".join(c if c.isalnum() else "-" for c in name)


def report_html(inventory: Inventory, title: str) -> str:
    """The page as a string (texts first, then figures, in the order written)."""
    entries = [e for e in inventory.entries if e.status == "written"]
    ordered = [e for e in entries if e.kind == "txt"] + [e for e in entries if e.kind == "png"]
    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>dials.diffuse_check: {html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>dials.diffuse_check: {html.escape(title)}</h1>",
        f"<p>Output directory: {html.escape(os.path.abspath(inventory.directory))}<br>"
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}</p>",
        "<nav><ul>",
    ]
    parts += [f"<li><a href='#{_anchor(e.name)}'>{html.escape(e.title)}</a> "
              f"<span class='fname'>{html.escape(e.name)}</span></li>" for e in ordered]
    parts.append("</ul></nav>")
    skipped = inventory.skipped()
    if skipped:
        parts.append("<h2>Skipped</h2><ul class='skipped'>")
        parts += [f"<li>{html.escape(e.name)}: {html.escape(e.reason)}</li>" for e in skipped]
        parts.append("</ul>")
    for e in ordered:
        path = inventory.path(e.name)
        parts.append(f"<h2 id='{_anchor(e.name)}'>{html.escape(e.title)} "
                     f"<span class='fname'>{html.escape(e.name)}</span></h2>")
        if e.kind == "txt":
            with open(path) as fh:
                parts.append(f"<pre>{html.escape(fh.read())}</pre>")
        else:
            with open(path, "rb") as fh:
                data = base64.b64encode(fh.read()).decode("ascii")
            parts.append(f"<img alt='{html.escape(e.name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(inventory: Inventory, path: str, title: str) -> str:
    write_text(path, report_html(inventory, title))
    logger.info("Wrote %s", path)
    return path

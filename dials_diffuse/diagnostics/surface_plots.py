"""Plot of mdx2's smooth scaling terms (``surfaces`` of
refined_scaling_model_params.json): the absorption a(x, y, phi) at a few
angles, the detector response d(x, y), the radial factor h(|s|) and the
offset c(|s|, phi). A function of the JSON document returning a Figure."""

from __future__ import annotations

import numpy as np

from dials_diffuse.diagnostics.plotting import new_figure
from dials_diffuse.surface_model import ControlGrid

# absorption panels: the angles of this many evenly spaced phi controls
ABSORPTION_ANGLES = 4


def _grid(surface):
    return ControlGrid(np.array(surface["lower"], float), np.array(surface["upper"], float),
                       tuple(surface["shape"]))


def _image(ax, fig, surface, fixed=None, title=""):
    """The surface over its first two coordinates (others fixed), as an image."""
    grid = _grid(surface)
    values = np.array(surface["control_values"], float)
    u = np.linspace(grid.lower[0], grid.upper[0], 80)
    v = np.linspace(grid.lower[1], grid.upper[1], 80)
    uu, vv = np.meshgrid(u, v, indexing="xy")
    columns = [uu.ravel(), vv.ravel()] + [np.full(uu.size, f) for f in (fixed or [])]
    z = grid.evaluate(values, np.stack(columns, axis=1)).reshape(uu.shape)
    im = ax.imshow(z, origin="lower", aspect="auto", cmap="viridis",
                   extent=(u[0], u[-1], v[0], v[-1]))
    fig.colorbar(im, ax=ax, fraction=0.046)
    names = surface["coordinates"]
    units = {"x": "x (mm)", "y": "y (mm)", "s": "|s| (1/Å)", "phi": "phi (deg)"}
    ax.set_xlabel(units[names[0]])
    ax.set_ylabel(units[names[1]])
    ax.set_title(title, fontsize=9)


def plot_scaling_surfaces(doc):
    """Every fitted surface of the document; absorption at up to
    ABSORPTION_ANGLES angles."""
    panels = []
    absorption = doc.get("absorption")
    if absorption is not None:
        if "phi" in absorption["coordinates"]:
            grid = _grid(absorption)
            axis = absorption["coordinates"].index("phi")
            angles = np.linspace(grid.lower[axis], grid.upper[axis],
                                 min(ABSORPTION_ANGLES, grid.shape[axis]))
            panels += [("image", absorption, [a], f"absorption a(x, y) at phi = {a:.0f} deg")
                       for a in angles]
        else:
            panels.append(("image", absorption, None, "absorption a(x, y)"))
    if doc.get("response") is not None:
        panels.append(("image", doc["response"], None, "detector response d(x, y)"))
    if doc.get("radial") is not None:
        panels.append(("radial", doc["radial"], None, "radial factor h(|s|) (divided out)"))
    if doc.get("offset") is not None:
        panels.append(("image", doc["offset"], None, "offset c(|s|, phi)"))
    ncols = min(3, max(1, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = new_figure(nrows, ncols, width=4.2 * ncols, height=3.6 * nrows)
    for ax, (kind, surface, fixed, title) in zip(axes.ravel(), panels):
        if kind == "image":
            _image(ax, fig, surface, fixed, title)
        else:
            grid = _grid(surface)
            s = np.linspace(grid.lower[0], grid.upper[0], 200)
            ax.plot(s, grid.evaluate(np.array(surface["control_values"], float), s[:, None]))
            ax.axhline(1.0, color="grey", ls=":")
            ax.set_xlabel("|s| (1/Å)")
            ax.set_ylabel("h")
            ax.set_title(title, fontsize=9)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Scaling surfaces (scaling.surfaces; mdx2's a, d, c)", fontsize=10)
    fig.tight_layout()
    return fig

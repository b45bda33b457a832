"""dials_diffuse: diffuse-scattering extraction, scaling and merging as DIALS commands."""

from setuptools import setup

# each command module's main(): run(), then exit without the interpreter's
# teardown (dials_diffuse.startup.run_and_exit)
COMMANDS = {
    "dials.diffuse_simulate": "dials_diffuse.command_line.simulate:main",
    "dials.diffuse_extract": "dials_diffuse.command_line.extract:main",
    "dials.diffuse_merge": "dials_diffuse.command_line.merge:main",
    "dials.diffuse_check": "dials_diffuse.command_line.check:main",
    "dials.diffuse_process": "dials_diffuse.command_line.process:main",
}

setup(
    name="dials_diffuse",
    version="0.1.0",
    description="Diffuse X-ray scattering maps from DIALS experiments",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # command_line/ sits at the top level (the design card) and installs as
    # dials_diffuse.command_line so imports stay namespaced.
    packages=[
        "dials_diffuse",
        "dials_diffuse.simulate",
        "dials_diffuse.diagnostics",
        "dials_diffuse.pipeline",
        "dials_diffuse.extraction",
        "dials_diffuse.scaling",
        "dials_diffuse.processing",
        "dials_diffuse.command_line",
    ],
    package_dir={
        "dials_diffuse": "dials_diffuse",
        "dials_diffuse.command_line": "command_line",
    },
    include_package_data=True,
    # numpy, scipy, matplotlib, dials, dxtbx, cctbx come from Debian's dials
    # package (system site packages); pip cannot provide cctbx.
    install_requires=[],
    extras_require={
        "dask": ["dask[distributed]"],
        "test": ["pytest", "hypothesis", "dask[distributed]"],
    },
    entry_points={
        "console_scripts": [f"{name}={target}" for name, target in COMMANDS.items()],
        # cctbx/DIALS build trees make dispatchers from this group
        "libtbx.dispatcher.script": [f"{name}={name}" for name in COMMANDS],
    },
)

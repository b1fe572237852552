"""Build the Cython modules under clipper/_native/.

``CLIPPER_DEBUG=1`` builds with bounds checks, assertions and -O0 -g.
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CLIPPER_DEBUG", "") not in ("", "0")

# Every clipper/_native/_NAME.pyx is a compiled module; its pure-Python twin is NAME_py.py.
NATIVE_MODULES = sorted(p.stem for p in (Path(__file__).parent / "clipper" / "_native").glob("_*.pyx"))

compile_args = ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
if DEBUG:
    compile_args += ["-O0", "-g", "-UNDEBUG"]
else:
    compile_args += ["-O2"]

extensions = [
    Extension(
        f"clipper._native.{name}",
        [f"clipper/_native/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=compile_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in NATIVE_MODULES
]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": not DEBUG,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=False))

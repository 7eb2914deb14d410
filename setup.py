"""Build the Cython kernels; all metadata lives in pyproject.toml."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DIRECTIVES = {"language_level": "3", "boundscheck": False, "wraparound": False,
              "cdivision": True, "initializedcheck": False}

# One compiled module per kernel subject; add a name here to build a new .pyx.
KERNELS = ("qcowfast._tables", "qcowfast._inflate", "qcowfast._deflate", "qcowfast._fill",
           "qcowfast._plain", "qcowfast._mapjson")

extensions = [
    Extension(name, [f"src/qcowfast/{name.split('.')[-1]}.pyx"],
              include_dirs=[numpy.get_include(), "src/qcowfast"],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
              extra_compile_args=["-O3"], libraries=["dl"])
    for name in KERNELS
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES))

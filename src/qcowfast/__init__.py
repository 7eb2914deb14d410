"""qcowfast: fast, safe reading and conversion of QCOW2 disk images.

Public names are imported on first use (PEP 562), so `import qcowfast` and the command line
start without loading numpy or the compiled kernels.
"""
__version__ = "0.1.0"

# Public name -> module that defines it (relative to the package).
_LAZY = {
    "open": "image", "Image": "image", "Extent": "image",
    "convert": "convert", "ConvertResult": "convert",
    "info": "info",
    "check": "check", "CheckResult": "check", "NotChecked": "check",
    "compare": "compare", "CompareResult": "compare",
    "measure": "measure", "Measurement": "measure",
    "serve": "serve",
    "convert_many": "fleet", "Skipped": "fleet",
    "ExtentKind": "constants",
    "Header": "header",
    "QcowError": "errors", "FormatError": "errors", "CorruptImage": "errors",
    "TruncatedImage": "errors", "DecompressionError": "errors", "UnsupportedFeature": "errors",
    "EncryptedImage": "errors", "BackingChainError": "errors", "UnsafePathError": "errors",
    "OutputError": "errors", "SnapshotNotFound": "errors", "ImageOpenError": "errors",
    "ImageNotFound": "errors", "MissingBackingFile": "errors", "ImageLocked": "errors",
    "AllocationFailed": "errors", "CodecUnavailable": "errors", "StaleBitmapsWarning": "errors",
    "CompareError": "errors",
}

__all__ = [
    "open", "convert", "info", "check", "compare", "measure", "serve", "convert_many",
    "Skipped", "Image", "Extent", "ExtentKind", "Header", "ConvertResult", "CheckResult",
    "CompareResult", "Measurement", "NotChecked",
    "QcowError", "FormatError", "CorruptImage", "TruncatedImage", "DecompressionError",
    "UnsupportedFeature", "EncryptedImage", "BackingChainError", "UnsafePathError", "OutputError",
    "SnapshotNotFound", "ImageOpenError", "ImageNotFound", "MissingBackingFile", "ImageLocked",
    "AllocationFailed", "CodecUnavailable", "StaleBitmapsWarning", "CompareError",
]

# For type checkers only (they treat any name TYPE_CHECKING as true; importing typing would
# cost every command a few milliseconds): the lazy names with their real types.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .check import CheckResult, NotChecked, check
    from .compare import CompareResult, compare
    from .constants import ExtentKind
    from .convert import ConvertResult, convert
    from .errors import (AllocationFailed, BackingChainError, CodecUnavailable, CompareError,
                         CorruptImage, DecompressionError, EncryptedImage, FormatError, ImageLocked,
                         ImageNotFound, ImageOpenError, MissingBackingFile, OutputError,
                         QcowError, SnapshotNotFound, StaleBitmapsWarning, TruncatedImage,
                         UnsafePathError, UnsupportedFeature)
    from .fleet import Skipped, convert_many
    from .header import Header
    from .image import Extent, Image, open
    from .info import info
    from .measure import Measurement, measure
    from .serve import serve

_ModuleType = type(__import__("sys"))


class _Package(_ModuleType):
    """The package module: importing submodule `info` (`convert`, `check`, ...) must not hide
    the function of the same name, as binding it on the package would."""

    def __setattr__(self, name, value):
        if _LAZY.get(name) == name and isinstance(value, _ModuleType):
            return
        super().__setattr__(name, value)


__import__("sys").modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qcowfast' has no attribute {name!r}")
    from importlib import import_module
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value          # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *__all__})

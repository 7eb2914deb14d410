"""qcowfast: fast, safe reading and conversion of QCOW2 disk images."""
from .check import CheckResult, check
from .compare import CompareResult, compare
from .constants import ExtentKind
from .convert import ConvertResult, convert
from .errors import (
    BackingChainError, CorruptImage, DecompressionError, EncryptedImage, FormatError, OutputError,
    QcowError, SnapshotNotFound, TruncatedImage, UnsafePathError, UnsupportedFeature,
)
from .header import Header
from .image import Extent, Image, open
from .info import info

__version__ = "0.1.0"

__all__ = [
    "open", "convert", "info", "check", "compare", "Image", "Extent", "ExtentKind", "Header",
    "ConvertResult", "CheckResult", "CompareResult",
    "QcowError", "FormatError", "CorruptImage", "TruncatedImage", "DecompressionError",
    "UnsupportedFeature", "EncryptedImage", "BackingChainError", "UnsafePathError", "OutputError",
    "SnapshotNotFound",
]

"""qcowfast: fast, safe reading and conversion of QCOW2 disk images."""
from .constants import ExtentKind
from .errors import (
    BackingChainError, CorruptImage, DecompressionError, EncryptedImage, FormatError, OutputError,
    QcowError, TruncatedImage, UnsafePathError, UnsupportedFeature,
)
from .header import Header
from .image import Extent, Image, open

__version__ = "0.1.0"

__all__ = [
    "open", "Image", "Extent", "ExtentKind", "Header", "QcowError", "FormatError", "CorruptImage",
    "TruncatedImage", "DecompressionError", "UnsupportedFeature", "EncryptedImage",
    "BackingChainError", "UnsafePathError", "OutputError",
]

from .convert import ConvertResult, convert  # noqa: E402

__all__ += ["convert", "ConvertResult"]

from .info import info  # noqa: E402
from .check import CheckResult, check  # noqa: E402
from .compare import CompareResult, compare  # noqa: E402

__all__ += ["info", "check", "CheckResult", "compare", "CompareResult"]

"""The qcowfast exception hierarchy: every failure qcowfast reports is a QcowError."""


class QcowError(Exception):
    """Root of all qcowfast exceptions."""

    #: For a file that cannot be opened (or one of its chain): QEMU's words for the failure
    #: below the image that was opened ("Could not open backing file: Could not open
    #: 'base.qcow2': No such file or directory"), that image (`qemu_top`), and the line QEMU
    #: adds after it, if any (`qemu_hint`); see in_chain() and the command line's error_text.
    qemu_chain: str | None = None
    qemu_top: str | None = None
    qemu_hint: str | None = None


class FormatError(QcowError, ValueError):
    """The file is not a QCOW2 image qcowfast can parse (bad magic, header fields out of range)."""


class CorruptImage(QcowError):
    """Metadata breaks a rule of the QCOW2 specification (bad table entry, overlap, bad offset).

    `guest_offset`: where a read met a bad L2 entry (its cluster's first byte) or a bad L1
    entry (where the read reached its range), when the error is one; reads and maps of guest
    bytes before it are unaffected."""
    guest_offset: int | None = None


class TruncatedImage(CorruptImage):
    """A table or data range lies (partly) past the end of the image file."""


class DecompressionError(CorruptImage):
    """A compressed cluster does not inflate to exactly one cluster."""


class UnsupportedFeature(QcowError):
    """The image uses a feature this build does not implement (named in the message)."""


class EncryptedImage(UnsupportedFeature):
    """The image is encrypted (legacy AES or LUKS); qcowfast does not decrypt."""


class BackingChainError(QcowError):
    """A backing chain is missing a file, loops, or is deeper than allowed."""


class UnsafePathError(QcowError):
    """A file named inside an image lies outside what the caller allowed to be opened."""


class OutputError(QcowError):
    """The conversion output cannot be written as asked (exists, is the source, ...)."""


class SnapshotNotFound(QcowError, LookupError):
    """No internal snapshot has the id or name asked for (the message lists those that exist)."""


class ImageOpenError(QcowError, OSError):
    """An image, backing or data file cannot be opened (the message names the path given).

    Like any OSError it carries `errno`, `strerror` and `filename` (also through pickling, for
    results sent between processes); str() is the message alone.
    """

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None,
                 filename: str | None = None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        return type(self), (str(self), self.errno, self.strerror, self.filename), \
            {k: v for k, v in vars(self).items() if k.startswith("qemu_")}


def in_chain(exc: BaseException, owner: str, backing: bool) -> None:
    """Record, on a failure to open a file `owner` needs (its backing file, or a file below
    it, when `backing`; else its data file), the line QEMU prints: bdrv_open_backing_file()
    prefixes "Could not open backing file: " at each layer, the innermost names the file."""
    if not isinstance(exc, QcowError):
        return
    if exc.qemu_chain is None:
        if not isinstance(exc, ImageOpenError) or not exc.strerror or exc.filename is None:
            return
        exc.qemu_chain = f"Could not open '{exc.filename}': {exc.strerror}"
    if backing:
        exc.qemu_chain = "Could not open backing file: " + exc.qemu_chain
    exc.qemu_top = owner


class ImageNotFound(ImageOpenError, FileNotFoundError):
    """An image, backing or data file does not exist (the message names the path given)."""


class MissingBackingFile(BackingChainError, ImageNotFound):
    """A file of a chain (backing or external data file, named or given) does not exist."""


class ImageLocked(QcowError):
    """A running QEMU holds the image open for writing; force_share=True (-U) reads anyway."""


class AllocationFailed(QcowError, MemoryError):
    """Memory ran out while reading or checking an image (not a property of the image)."""


class CodecUnavailable(QcowError):
    """The C library behind a compression type could not be loaded."""


class StaleBitmapsWarning(UserWarning):
    """The image has a bitmaps extension without its autoclear bit: a program lacking bitmap
    support wrote it, so QEMU takes every bitmap as inconsistent (their clusters may leak)."""


class CompareError(QcowError):
    """`compare` could not read an image once both were open; `exit_code` is qemu-img
    compare's: 3 when finding what is allocated failed, 4 when reading data failed (the
    error met is the exception's __cause__)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return type(self), (str(self), self.exit_code)

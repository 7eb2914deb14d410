import numpy as np

from .errors import AllocationFailed as AllocationFailed, CodecUnavailable as CodecUnavailable

COMPRESSION_TYPES: dict[str, int]


def check_codec(compression_type: int) -> None: ...

class Decompressor:
    compression_type: int
    cluster_size: int
    input_exhausted: bool
    def __init__(self, compression_type: int, cluster_size: int) -> None: ...
    def inflate_batch(self, src, in_off: np.ndarray, in_len: np.ndarray, dst,
                      out_off: np.ndarray) -> int: ...

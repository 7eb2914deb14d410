import numpy as np

from .errors import CodecUnavailable as CodecUnavailable, QcowError

ZERO_CLUSTER: int
STORED: int
REFCOUNT_MAX: int


class CompressionError(QcowError): ...

class Compressor:
    compression_type: int
    level: int
    cluster_size: int
    def __init__(self, compression_type: int, cluster_size: int, level: int) -> None: ...
    def compress_batch(self, src, in_off: np.ndarray, dst, out_off: np.ndarray,
                       out_len: np.ndarray, keep_zero: bool = ...) -> None: ...

def pack(src, in_off: np.ndarray, comp, out_off: np.ndarray, out_len: np.ndarray,
         cluster_bits: int, state: np.ndarray, staging, carry, refcounts: np.ndarray,
         rc_base: int, entries: np.ndarray, runs: np.ndarray) -> tuple[int, int]: ...

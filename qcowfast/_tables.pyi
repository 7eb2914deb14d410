import numpy as np

FLAGS: dict[str, int]

class L2EntryError(Exception):
    index: int
    code: int
    rule: str
    past_eof: bool

def classify_l2(l2_be: np.ndarray, first: int, count: int, cluster_bits: int, flags: int,
                guest_base: int, host_limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                           np.ndarray, np.ndarray]: ...
def l1_check(l1_be: np.ndarray, cluster_bits: int, host_limit: int) -> int: ...
def l1_offsets(l1_be: np.ndarray) -> np.ndarray: ...
def nonzero_runs(buf, granularity: int, origin: int = ...) -> tuple[np.ndarray, np.ndarray]: ...

SMALL_ENTRIES: int

def classify_small(l2_u64: np.ndarray, first: int, count: int, cluster_bits: int, flags: int,
                   guest_base: int, host_limit: int) -> list[tuple[int, int, int, int, int]]: ...

class SmallReader:
    def __init__(self, layer: object, backing: SmallReader | None, fd: int, virtual_size: int,
                 data_size: int, l2_offsets: np.ndarray | None = ..., l2_cache: dict | None = ...,
                 cluster_bits: int = ..., flags: int = ..., per_l1: int = ...,
                 slice_entries: int = ...) -> None: ...
    def read(self, offset: int, size: int) -> bytes | None: ...
    def readinto(self, offset: int, buffer: memoryview) -> int: ...

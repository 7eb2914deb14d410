#!/usr/bin/env python3
"""Coverage-guided fuzzing of the NBD server's handshake and request parser (atheris).

Each input is the byte stream a client sends after the server's greeting. It is fed to one
`qcowfast.nbd.Connection` over a socketpair, serving a small in-memory export; the client side
then half-closes and drains the replies. The connection must end by itself within a few
seconds (a hang is a crash) and only with a `Disconnect` or an error reply; any exception that
escapes `Connection.run` or is logged as an error is a crash.

    pip install atheris
    python fuzz/fuzz_nbd.py -max_total_time=60 -timeout=10 -rss_limit_mb=1024
    python fuzz/fuzz_nbd.py --replay FILE...          # without atheris

tests/test_nbd_protocol.py runs the same kind of sessions through hypothesis.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading

if __name__ == "__main__" and sys.argv[1:2] == ["--replay"]:
    from qcowfast import nbd
else:
    import atheris

    with atheris.instrument_imports(include=["qcowfast.nbd"]):
        from qcowfast import nbd

SIZE = 1 << 20
_DATA = bytes(range(256)) * (SIZE // 256)
LIMITS = nbd.Limits(max_request=1 << 16, max_options=32, handshake_timeout=2.0,
                    io_timeout=1.0, workers=2)


class MemoryExport:
    name = ""
    description = "fuzz"
    size = SIZE
    preferred_block_size = 4096

    def read_into(self, offset, out):
        out[:] = _DATA[offset:offset + len(out)]

    def allocation(self, offset, length, max_extents):
        half = SIZE // 2
        if offset < half:
            return [(half - offset, 0), (SIZE - half, 3)][:max_extents]
        return [(SIZE - offset, 3)]


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


_errors = _Errors()
logging.getLogger("qcowfast.serve").addHandler(_errors)


def TestOneInput(data: bytes) -> None:
    server_sock, client = socket.socketpair()
    conn = nbd.Connection(server_sock, MemoryExport(), LIMITS)
    escaped = []

    def run():
        try:
            conn.run()
        except BaseException as exc:          # noqa: BLE001  (reported below)
            escaped.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client.settimeout(5)
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        while client.recv(1 << 16):
            pass
    except OSError:
        pass
    client.close()
    thread.join(5)
    if thread.is_alive():
        raise RuntimeError("the connection did not end within 5 s")
    if escaped:
        raise escaped[0]
    if _errors.seen:
        raise RuntimeError(f"server logged errors: {_errors.seen}")


def main() -> None:
    if sys.argv[1:2] == ["--replay"]:
        crashes = 0
        for path in sys.argv[2:]:
            try:
                with open(path, "rb") as f:
                    TestOneInput(f.read())
            except Exception as exc:         # noqa: BLE001
                crashes += 1
                print(f"{path}: {type(exc).__name__}: {exc}")
        print(f"{len(sys.argv) - 2} inputs, {crashes} crashes")
        sys.exit(1 if crashes else 0)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

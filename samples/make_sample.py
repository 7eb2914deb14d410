"""Recreate sample.qcow2: 8 MiB of mixed content (text, patterned binary, zeros), zlib-compressed
with 64 KiB clusters, version 3. Needs qemu-img. Run: python samples/make_sample.py"""
import os
import random
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def content(size: int = 8 << 20) -> bytes:
    rng = random.Random(2026)
    words = [b"qcow2", b"cluster", b"refcount", b"snapshot", b"backing", b"zlib", b"guest", b"disk"]
    out = bytearray(size)
    pos = 0
    while pos < size:
        kind = rng.choice(("text", "binary", "zeros", "random"))
        n = rng.randint(3000, 300000)
        if kind == "text":
            chunk = b" ".join(rng.choice(words) for _ in range(n // 6))[:n]
        elif kind == "binary":
            chunk = bytes(rng.randrange(16) * 17 for _ in range(256)) * (n // 256 + 1)
        elif kind == "random":
            chunk = rng.randbytes(min(n, 3000))
        else:
            chunk = bytes(n)
        out[pos:pos + len(chunk)] = chunk[:size - pos]
        pos += len(chunk)
    return bytes(out)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "sample.raw")
        with open(raw, "wb") as f:
            f.write(content())
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compat=1.1", raw,
                        os.path.join(HERE, "sample.qcow2")], check=True)

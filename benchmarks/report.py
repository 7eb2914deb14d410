"""Turn a ``--benchmark-json`` file of the conversion benchmarks into a Markdown table.

One row per image: throughput (virtual MiB per second of the median wall time) of qemu-img,
qemu-img -m 16 -W and qcowfast; qcowfast's speed-up over both (above 1 means faster); peak RSS.

    python benchmarks/report.py out.json [rerun.json ...] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import sys

MiB = 1 << 20
TOOLS = ("qemu-img", "qemu-img-m16W", "qcowfast")
#: Rows measured while other processes used at least this many cores are flagged.
NOISY_LOAD = 0.25
#: Row order when the variants are known; others follow in file order.
VARIANT_ORDER = ("u64k", "zlib64k", "zlib4k", "zlib2m", "zstd64k", "extl2-zlib64k",
                 "v2-zlib64k", "overlay")


def _size(n: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", MiB)):
        if n % factor == 0:
            return f"{n // factor} {unit}iB"
    return f"{n / MiB:.1f} MiB"


def collect(data: dict) -> tuple[dict, set]:
    """Return ``{variant: {tool: entry}}`` and the set of virtual sizes seen."""
    rows: dict[str, dict] = {}
    sizes = set()
    for bench in data["benchmarks"]:
        params = bench.get("params") or {}
        info = bench.get("extra_info") or {}
        variant, tool = params.get("variant"), params.get("tool")
        if variant is None or tool is None or "virtual_bytes" not in info:
            continue  # not a conversion benchmark (e.g. a kernel micro-benchmark)
        median = bench["stats"]["median"]
        sizes.add(info["virtual_bytes"])
        rows.setdefault(variant, {})[tool] = {
            "mib_s": info["virtual_bytes"] / median / MiB,
            "median": median,
            "rounds": bench["stats"]["rounds"],
            "rss": info.get("peak_rss_mib"),
            "ok": info.get("digest_ok", True),
            "image_bytes": info.get("image_bytes"),
            "other_load": info.get("other_load_cores", 0.0),
            "cpu": info.get("cpu_s_median"),
        }
    return rows, sizes


def table(data: dict) -> str:
    rows, sizes = collect(data)
    order = [v for v in VARIANT_ORDER if v in rows] + [v for v in rows if v not in VARIANT_ORDER]
    out = []
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    rounds = sorted({e["rounds"] for r in rows.values() for e in r.values()})
    brand = cpu.get("brand_raw", machine.get("processor", "?"))
    out.append(f"Virtual size {', '.join(_size(s) for s in sorted(sizes)) or '?'}; "
               f"median of {'/'.join(map(str, rounds))} rounds; "
               f"{cpu.get('count', '?')} CPUs ({brand}); "
               f"{data.get('datetime', '')[:16]}. Throughput in virtual MiB/s; "
               "ratio = qcowfast speed / qemu-img speed.")
    out.append("")
    out.append("| image | image MiB | qemu-img MiB/s | qemu-img -m16 -W MiB/s | qcowfast MiB/s "
               "| qcowfast / qemu-img | qcowfast / -m16 -W | qcowfast peak RSS MiB "
               "| qemu-img peak RSS MiB |")
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    mismatches = []

    def speed(entry):
        if entry is None:
            return "—"
        return f"{entry['mib_s']:.0f}" + ("" if entry["ok"] else " ✗")

    def ratio(a, b):
        return "—" if a is None or b is None else f"{a['mib_s'] / b['mib_s']:.2f}×"

    for variant in order:
        by_tool = rows[variant]
        q, m, f = (by_tool.get(t) for t in TOOLS)
        any_entry = next(iter(by_tool.values()))
        image = any_entry["image_bytes"]
        mismatches += [f"{variant}/{t}" for t, e in by_tool.items() if not e["ok"]]
        out.append(" | ".join([
            f"| {variant}",
            f"{image / MiB:.0f}" if image else "—",
            speed(q), speed(m), speed(f), ratio(f, q), ratio(f, m),
            "—" if f is None or f["rss"] is None else f"{f['rss']:.0f}",
            "—" if q is None or q["rss"] is None else f"{q['rss']:.0f}",
        ]) + " |")
    noisy = [f"{v}/{t} ({e['other_load']:.1f})" for v in order for t, e in rows[v].items()
             if e["other_load"] >= NOISY_LOAD]
    if noisy:
        out.append("")
        out.append("Noisy: other processes kept this many cores busy during a timed round: "
                   + ", ".join(noisy))
    if mismatches:
        out.append("")
        out.append("✗ output digest differs from qemu-img's: " + ", ".join(mismatches))
    return "\n".join(out)


def cpu_table(data: dict) -> str:
    """Return a table of median CPU seconds (user + system, all threads) per conversion."""
    rows, _ = collect(data)
    order = [v for v in VARIANT_ORDER if v in rows] + [v for v in rows if v not in VARIANT_ORDER]
    out = ["| image | qemu-img CPU s | qemu-img -m16 -W CPU s | qcowfast CPU s "
           "| qcowfast / qemu-img |", "|---|--:|--:|--:|--:|"]
    for variant in order:
        q, m, f = (rows[variant].get(t) for t in TOOLS)
        cells = ["—" if e is None or e["cpu"] is None else f"{e['cpu']:.2f}" for e in (q, m, f)]
        ratio = ("—" if q is None or f is None or not q["cpu"] or f["cpu"] is None
                 else f"{f['cpu'] / q['cpu']:.2f}×")
        out.append(" | ".join([f"| {variant}", *cells, ratio]) + " |")
    return "\n".join(out)


def merge(paths: list[str]) -> dict:
    """Load benchmark JSON files; a benchmark in a later file replaces one of the same name."""
    merged: dict = {}
    by_name: dict[str, dict] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        merged.update({k: v for k, v in data.items() if k != "benchmarks"})
        by_name.update((b["fullname"], b) for b in data["benchmarks"])
    merged["benchmarks"] = list(by_name.values())
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+",
                        help="files written by pytest --benchmark-json; a benchmark found in "
                             "several files is taken from the last")
    parser.add_argument("--cpu", action="store_true",
                        help="also print median CPU time per conversion (steadier than wall "
                             "time on a busy machine)")
    args = parser.parse_args(argv)
    data = merge(args.json)
    print(table(data))
    if args.cpu:
        print()
        print(cpu_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

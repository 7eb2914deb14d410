"""Turn a ``--benchmark-json`` file of the conversion benchmarks into a Markdown table.

One row per image: median whole-process seconds of qemu-img, qemu-img -m 2 -W and qcowfast;
qcowfast's speed-up (above 1 means faster) against the target; the machine's bound for the
image (test_bench_bound.py) and qcowfast's fraction of it; peak RSS. Then the read benchmarks
(test_bench_reads.py): random 4 KiB reads beside dissect.hypervisor, sequential 1 MiB reads.

    python benchmarks/report.py out.json [rerun.json ...] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import sys

MiB = 1 << 20
TOOLS = ("qemu-img", "qemu-img-m2W", "qcowfast")
#: Rows measured while other processes used at least this many cores are flagged.
NOISY_LOAD = 0.25
#: Row order when the variants are known; others follow in file order.
VARIANT_ORDER = ("u64k", "v2-u64k", "extl2-u128k", "overlay", "u4g", "zlib64k", "zlib4k",
                 "zlib2m", "zstd64k", "extl2-zlib64k", "v2-zlib64k")
#: Issue 15 targets: qcowfast speed over qemu-img's (u4g: over qemu-img -m 2 -W).
TARGETS = {"zlib64k": 3.0, "zstd64k": 2.0, "zlib2m": 2.0, "zlib4k": 10.0,
           "extl2-zlib64k": 2.0, "v2-zlib64k": 2.0}
UNCOMPRESSED_TARGET = 1.0
BOUND_TARGET = 0.8
READ_TARGETS = {"u64k": 20.0, "overlay": 20.0, "zlib64k": 2.0, "zstd64k": 2.0}


def _size(n: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", MiB)):
        if n % factor == 0:
            return f"{n // factor} {unit}iB"
    return f"{n / MiB:.1f} MiB"


def collect(data: dict) -> tuple[dict, set]:
    """Return ``{variant: {tool: entry}}`` of the conversion and bound benchmarks, and the set
    of virtual sizes seen."""
    rows: dict[str, dict] = {}
    sizes = set()
    for bench in data["benchmarks"]:
        params = bench.get("params") or {}
        info = bench.get("extra_info") or {}
        variant, tool = params.get("variant"), params.get("tool") or info.get("tool")
        if variant is None or tool is None or "virtual_bytes" not in info:
            continue  # not a conversion benchmark (e.g. a kernel micro-benchmark)
        if not bench.get("fullname", "").split("::")[0].endswith(
                ("test_bench_convert.py", "test_bench_bound.py")):
            continue  # reads (see reads_table) and other files' benchmarks
        median = bench["stats"]["median"]
        if tool != "bound":
            sizes.add(info["virtual_bytes"])
        rows.setdefault(variant, {})[tool] = {
            "s": info.get("bound_s", median) if tool == "bound" else median,
            "mib_s": info["virtual_bytes"] / median / MiB,
            "median": median,
            "rounds": bench["stats"]["rounds"],
            "rss": info.get("peak_rss_mib"),
            "ok": info.get("digest_ok", True),
            "image_bytes": info.get("image_bytes"),
            "other_load": info.get("other_load_cores", 0.0),
            "cpu": info.get("cpu_s_median"),
            "fs": info.get("output_fs"),
            "parts": {k: info.get(k) for k in ("startup_s", "copy_s", "inflate_s")},
        }
    return rows, sizes


def _target(variant: str) -> float:
    return TARGETS.get(variant, UNCOMPRESSED_TARGET)


def table(data: dict) -> str:
    rows, sizes = collect(data)
    order = [v for v in VARIANT_ORDER if v in rows] + [v for v in rows if v not in VARIANT_ORDER]
    out = []
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    rounds = sorted({e["rounds"] for r in rows.values() for e in r.values()})
    brand = cpu.get("brand_raw", machine.get("processor", "?"))
    fs = sorted({e["fs"] for r in rows.values() for e in r.values() if e.get("fs")})
    out.append(f"Virtual size {', '.join(_size(s) for s in sorted(sizes)) or '?'}; "
               f"median of {'/'.join(map(str, rounds))} rounds, whole process; "
               f"{cpu.get('count', '?')} CPUs ({brand}); outputs on {'/'.join(fs) or '?'}; "
               f"{data.get('datetime', '')[:16]}. Ratio = qemu-img time / qcowfast time (u4g: "
               "qemu-img -m 2 -W); fraction of bound = bound time / qcowfast time.")
    out.append("")
    out.append("| image | qemu-img s | qemu-img -m 2 -W s | qcowfast s | ratio | vs -m 2 -W "
               "| target | bound s | fraction of bound | qcowfast peak RSS MiB |")
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    mismatches = []

    def secs(entry):
        if entry is None:
            return "—"
        return f"{entry['s']:.2f}" + ("" if entry["ok"] else " ✗")

    def ratio(ref, f):
        return "—" if ref is None or f is None else f"{ref['s'] / f['s']:.2f}×"

    for variant in order:
        by_tool = rows[variant]
        q, m, f, b = (by_tool.get(t) for t in (*TOOLS, "bound"))
        mismatches += [f"{variant}/{t}" for t, e in by_tool.items() if not e["ok"]]
        main = ratio(m if variant == "u4g" else q, f)
        target = _target(variant)
        met = "" if main == "—" else (" ✓" if float(main[:-1]) >= target else " (missed)")
        frac = "—" if b is None or f is None else f"{b['s'] / f['s']:.0%}"
        out.append(" | ".join([
            f"| {variant}", secs(q), secs(m), secs(f), f"**{main}**", ratio(m, f),
            f"≥ {target:g}×{met}", secs(b), frac,
            "—" if f is None or f["rss"] is None else f"{f['rss']:.0f}",
        ]) + " |")
    bounds = [(v, rows[v]["bound"]["parts"]) for v in order if "bound" in rows[v]]
    if bounds:
        out.append("")
        out.append("Bound = interpreter start-up + page-cache copy of the image's data + "
                   "inflating its compressed clusters on all cores: " + "; ".join(
                       f"{v} {p['startup_s']:.2f} + {p['copy_s']:.2f} + {p['inflate_s']:.2f} s"
                       for v, p in bounds if p.get("copy_s") is not None) + ".")
    noisy = [f"{v}/{t} ({e['other_load']:.1f})" for v in order for t, e in rows[v].items()
             if (e["other_load"] or 0) >= NOISY_LOAD]
    if noisy:
        out.append("")
        out.append("Noisy: other processes kept this many cores busy during a timed round: "
                   + ", ".join(noisy))
    if mismatches:
        out.append("")
        out.append("✗ output digest differs from qemu-img's: " + ", ".join(mismatches))
    return "\n".join(out)


def reads_table(data: dict) -> str:
    """Random 4 KiB reads (qcowfast vs dissect.hypervisor) and sequential 1 MiB reads."""
    rnd: dict = {}
    seq: dict = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if info.get("kind") == "random-reads":
            rnd.setdefault(info["variant"], {})[info["tool"]] = \
                info["reads"] / bench["stats"]["median"]
        elif info.get("kind") == "sequential-reads":
            seq.setdefault(info["variant"], {})[info["tool"]] = \
                info["bytes"] / bench["stats"]["median"] / MiB
    if not rnd and not seq:
        return ""
    out = ["| image | qcowfast reads/s | dissect.hypervisor reads/s | ratio | target "
           "| as_file 1 MiB reads MiB/s | convert in-process MiB/s | as_file / convert |",
           "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for v in [v for v in VARIANT_ORDER if v in rnd or v in seq]:
        r, s = rnd.get(v, {}), seq.get(v, {})
        q, d = r.get("qcowfast"), r.get("dissect")
        a, c = s.get("as_file"), s.get("convert")
        t = READ_TARGETS.get(v)
        out.append(" | ".join([
            f"| {v}", f"{q:,.0f}" if q else "—", f"{d:,.0f}" if d else "—",
            f"**{q / d:.1f}×**" if q and d else "—", f"≥ {t:g}×" if t else "—",
            f"{a:.0f}" if a else "—", f"{c:.0f}" if c else "—",
            f"{a / c:.0%}" if a and c else "—"]) + " |")
    return "\n".join(out)


FLEET_ROWS = (("qemu-img-loop", "(a) shell loop of `qemu-img convert`"),
              ("qcowfast-process-loop", "(b) shell loop of `qcowfast convert` processes"),
              ("convert_many", "(c) `qcowfast.convert_many`"),
              ("dask", "(d) `qcowfast.dask.convert_many`, 2-worker LocalCluster (after start)"),
              ("python-loop", "(e) in-process loop of `qcowfast.convert`"))


def fleet_table(data: dict) -> str:
    """The dozen small images five ways (medians), and the paired rounds of (c), (d), (e)."""
    times, paired, scale = {}, None, {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if info.get("kind") == "fleet-paired":
            paired = info
        elif info.get("kind") == "fleet-scale":
            scale[info["approach"]] = (bench["stats"]["median"], info["images"],
                                       info["neighbours"])
        elif (bench.get("group") or "").startswith("fleet") and "approach" in info:
            times[info["approach"]] = bench["stats"]["median"]
    if not times and not paired and not scale:
        return ""
    base = times.get("qemu-img-loop")
    out = ["| approach | s | vs qemu-img loop |", "|---|--:|--:|"] if times else []
    for key, label in FLEET_ROWS:
        if key in times:
            ratio = f"{base / times[key]:.2f}×" if base else "—"
            out.append(f"| {label} | {times[key]:.3f} | {ratio} |")
    c, d, e = (times.get(k) for k in ("convert_many", "dask", "python-loop"))
    if c and d and e:
        out.append("")
        out.append(f"(d) / (c) = {d / c:.2f} (target ≤ 1.15); (e) / (c) = {e / c:.2f} "
                   "(target ≥ 1.3).")
    if paired:
        m = paired["medians"]
        out.append(f"Paired rounds ({paired['rounds']}, each running (c), (e), (d) in turn): "
                   f"(c) {m['convert_many']:.3f} s, (d) {m['dask']:.3f} s, "
                   f"(e) {m['python-loop']:.3f} s; median of the per-round ratios "
                   f"(d) / (c) = {paired['dask_over_convert_many']:.2f}, "
                   f"(e) / (c) = {paired['python_loop_over_convert_many']:.2f}.")
        if "ceiling" in m:
            out.append(f"Ceiling on {paired['cores']} cores (as many copies of the batch "
                       "converted side by side in this process, one thread each; per batch): "
                       f"{m['ceiling']:.3f} s; (c) / ceiling = "
                       f"{paired['convert_many_over_ceiling']:.2f} (1.00: at the in-process "
                       f"limit), (e) / ceiling = {paired['python_loop_over_ceiling']:.2f} "
                       "(the most (e) / (c) can be in one process).")
        if "process-ceiling" in m:
            out.append(f"Process ceiling (the same copies, each in a process of its own: the "
                       f"machine's limit): {m['process-ceiling']:.3f} s; (c) / process ceiling "
                       f"= {paired['convert_many_over_process_ceiling']:.2f}, (e) / process "
                       f"ceiling = {paired['python_loop_over_process_ceiling']:.2f}.")
    if "qemu-img-loop" in scale and "convert_many" in scale:
        (q, n, neighbours), (c, _, _) = scale["qemu-img-loop"], scale["convert_many"]
        out.append("")
        out.append(f"Scale: {n} jobs of a 1 MiB image into a directory of {neighbours} other "
                   f"files: `qemu-img convert` loop {q:.2f} s ({q / n * 1000:.2f} ms a job), "
                   f"`convert_many` {c:.2f} s ({c / n * 1000:.2f} ms a job), {q / c:.1f}×.")
    return "\n".join(out)


WRITE_TARGETS = {"zlib": "≥ 3×, ≥ 1.5×, ≤ 1.03", "zstd": "≥ 1.5× both, ≤ 1.03", "none": "≥ 1×"}


def write_table(data: dict) -> str:
    """Raw -> qcow2 (test_bench_write.py): medians per compression and tool, and the paired
    rounds of the uncompressed case."""
    rows: dict = {}
    paired = None
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if info.get("kind") == "write-paired":
            paired = info
        elif str(info.get("variant", "")).startswith("raw->qcow2-"):
            comp = info["variant"].rsplit("-", 1)[1]
            rows.setdefault(comp, {})[info["tool"]] = (bench["stats"]["median"],
                                                       info.get("size_ratio"))
    if not rows and not paired:
        return ""
    out = ["| compression | qemu-img s | qemu-img -m 2 -W s | qcowfast s | vs qemu-img "
           "| vs -m 2 -W | size vs qemu-img | target |", "|---|--:|--:|--:|--:|--:|--:|---|",
           ] if rows else []
    for comp in [c for c in ("zlib", "zstd", "none") if c in rows]:
        tools = rows[comp]
        q, m = (tools.get(t, (None, None))[0] for t in ("qemu-img", "qemu-img-m2W"))
        for tool in ("qcowfast", "qcowfast-fast"):
            if tool not in tools:
                continue
            s, size = tools[tool]
            first = tool == "qcowfast"
            out.append(" | ".join([
                f"| {comp}" + ("" if first else ", faster level"),
                f"{q:.2f}" if first and q else "", f"{m:.2f}" if first and m else "",
                f"{s:.2f}", f"{q / s:.2f}×" if q else "—", f"{m / s:.2f}×" if m else "—",
                f"{size:.3f}" if size else "—", WRITE_TARGETS[comp] if first else ""]) + " |")
    if paired:
        m = paired["medians"]
        out += [""] if out else []
        out.append(f"Uncompressed, paired rounds ({paired['rounds']}, the three tools in turn, "
                   f"order rotating): qemu-img {m['qemu-img']:.3f} s, -m 2 -W "
                   f"{m['qemu-img-m2W']:.3f} s, qcowfast {m['qcowfast']:.3f} s; median of the "
                   f"per-round ratios {paired['qemu_img_over_qcowfast']:.2f}× qemu-img and "
                   f"{paired['m2w_over_qcowfast']:.2f}× -m 2 -W; qcowfast ahead of qemu-img in "
                   f"{paired['rounds_qcowfast_ahead']} of {paired['rounds']} rounds.")
    return "\n".join(out)


INSPECT_IMAGES = {"u64k": "u64k (1 GiB)", "zlib64k": "zlib64k (1 GiB)",
                  "striped": "striped (10⁶ map entries)"}


def inspect_table(data: dict) -> str:
    """Inspection commands (test_bench_inspect.py): medians of both tools, per image."""
    rows: dict = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if (bench.get("group") or "").startswith("inspect:") and "command" in info:
            rows.setdefault((info["image"], info["command"]), {})[info["tool"]] = \
                bench["stats"]["median"]
    if not rows:
        return ""
    out = ["| image | command | qemu-img s | qcowfast s | ratio |", "|---|---|--:|--:|--:|"]
    images = [i for i in INSPECT_IMAGES if any(k[0] == i for k in rows)]
    for image in images + sorted({k[0] for k in rows} - set(images)):
        for (i, command), t in rows.items():
            if i != image or "qemu-img" not in t or "qcowfast" not in t:
                continue
            out.append(f"| {INSPECT_IMAGES.get(image, image)} | `{command}` | "
                       f"{t['qemu-img']:.3f} | {t['qcowfast']:.3f} | "
                       f"{t['qemu-img'] / t['qcowfast']:.2f}× |")
    return "\n".join(out)


def cpu_table(data: dict) -> str:
    """Return a table of median CPU seconds (user + system, all threads) per conversion."""
    rows, _ = collect(data)
    order = [v for v in VARIANT_ORDER if v in rows] + [v for v in rows if v not in VARIANT_ORDER]
    out = ["| image | qemu-img CPU s | qemu-img -m 2 -W CPU s | qcowfast CPU s "
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
    reads = reads_table(data)
    if reads:
        print()
        print(reads)
    write = write_table(data)
    if write:
        print()
        print(write)
    fleet = fleet_table(data)
    if fleet:
        print()
        print(fleet)
    inspect = inspect_table(data)
    if inspect:
        print()
        print(inspect)
    if args.cpu:
        print()
        print(cpu_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

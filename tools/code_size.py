"""Bytes of machine code of each spec's kernels, and where the attention
kernel's code comes from in the source, without a GPU.

    python tools/code_size.py [--specs f16:64:8:dense,f16:64:8:dense:16 ...] [--arch sm_90]
                              [--by-source 50] [--json sizes.json]

For each spec (dtype:head_dim:group:dense|paged[:features], as in
tools/sass_loop.py): NVRTC compiles it to a cubin (as the package does) and
the size of each kernel's ``.text`` section is read from the ELF (NVRTC
only; CI runs this). Prints the attention, combine and schedule-dump
entries' bytes.

``--by-source N``: also the attention entry's instructions by N-line
blocks of kernels_cu/lean_attention.cu (the header's lines as one row),
each block named by the first function it defines. The PTX is assembled
with line information by ptxas and read by nvdisasm (both found as
tools/sass_loop.py finds ptxas; NVDISASM=... or on PATH), so this part
needs the CUDA toolkit's tools. Code that the compiler inlined counts at
the line it came from, once per inlined copy. The sizes are static: an
SM fetches only the code it runs, and branches the kernel takes on one
call only (the merge's variants, the split path) count here in full.

Why: the kernel's code is fetched cold by every SM at the start of a call,
and on calls of a few microseconds the warps wait on instruction fetch
(Nsight Compute's ``no_instruction`` stall; bench/NOTES.md, session 33: an
fp8 spec's code was about a fifth larger than the fp16 one's, and its small
calls were 1.1-1.4x slower than fp16's).
"""

import argparse
import collections
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SPECS = ("f16:64:8:dense", "f16:64:8:dense:16", "f16:128:8:dense", "f16:128:8:dense:16",
                 "f16:256:8:dense", "f16:256:8:dense:16", "f16:128:8:paged", "f16:128:8:paged:16")


def text_sizes(cubin: bytes) -> dict:
    """``{function name: bytes}`` of a cubin's ``.text.<name>`` sections
    (a 64-bit little-endian ELF, as NVRTC writes). Raises ValueError on
    anything else."""
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("cubin: expected a 64-bit little-endian ELF")
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_at = struct.unpack_from("<HHH", cubin, 0x3A)
    if entsize < 40 or names_at >= count or shoff + count * entsize > len(cubin):
        raise ValueError(f"cubin: its section headers ({count} of {entsize} bytes at {shoff}) are not in its "
                         f"{len(cubin)} bytes")
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    names = sections[names_at][4]  # the section-name table's file offset
    out = {}
    for name, _type, _flags, _addr, _off, size in sections:
        end = cubin.index(b"\0", names + name)
        n = cubin[names + name:end].decode()
        if n.startswith(".text."):
            out[n[len(".text."):]] = size
    return out


def spec_sizes(spec, arch="sm_90") -> dict:
    """``{"attention" | "combine" | "dump": bytes}`` of a spec's entries."""
    from cupy_lean import kernels as K

    sizes = text_sizes(K.compile_cubin(spec, arch))
    return {"attention": sizes[spec.entry], "combine": sizes[spec.combine_entry], "dump": sizes[spec.dump_entry]}


def source_blocks(listing: str, entry: str, block: int, source_lines) -> list:
    """Instructions of ``entry`` in an ``nvdisasm -g -c`` listing by
    ``block``-line blocks of the kernel source: ``[(label, count)]``, most
    first. ``source_lines``: the kernel source's lines (for each block's
    label: the first function it defines)."""
    counts = collections.Counter()
    inside, where = False, None
    for line in listing.splitlines():
        s = line.strip()
        if s.startswith(".section"):
            inside = re.search(r"\.text\." + re.escape(entry) + r"\b", s) is not None
            where = None
            continue
        m = re.search(r'//## File "([^"]*)", line (\d+)', line)
        if m:
            f = os.path.basename(m.group(1))
            where = int(m.group(2)) if f.startswith("lean_") and f.endswith(".cu") else f
            continue
        if inside and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            counts[(where - 1) // block * block + 1 if isinstance(where, int) else (where or "?")] += 1
    out = []
    for key, n in counts.most_common():
        if isinstance(key, int):
            text = source_lines[key - 1:key - 1 + block]
            name = next((m.group(1) for t in text if "__device__" in t or "__global__" in t
                         for m in [re.search(r"(\w+)\s*\(", re.sub(r"__launch_bounds__\([^)]*\)", "", t))]
                         if m), "")
            out.append((f"lines {key}-{key + block - 1}" + (f" ({name})" if name else ""), n))
        else:
            out.append((str(key), n))
    return out


def _by_source(spec, arch, block):
    import sass_loop
    from cupy_lean import kernels as K

    ptxas = sass_loop._tool("ptxas", "PTXAS")
    nvdisasm = sass_loop._tool("nvdisasm", "NVDISASM")
    ptx = K.compile_ptx(spec, arch, lineinfo=True).rstrip("\0")
    with tempfile.TemporaryDirectory(prefix="cupy_lean_size_") as tmp:
        path = os.path.join(tmp, spec.name + ".cubin")
        sass_loop._assemble(ptx, ptxas, path, arch, flags=("-lineinfo",))
        listing = subprocess.run([nvdisasm, "-g", "-c", path], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(K.kernel_dir(), "lean_attention.cu")) as f:
        lines = f.read().splitlines()
    return source_blocks(listing, spec.entry, block, lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(DEFAULT_SPECS),
                    help="comma-separated dtype:head_dim:group:dense|paged[:features] (features: kernels.FEATURES bits)")
    ap.add_argument("--arch", default="sm_90", help="sm_80 or sm_90 (default sm_90)")
    ap.add_argument("--by-source", type=int, default=0, metavar="N",
                    help="also the attention entry's instructions by N-line source blocks (needs ptxas, nvdisasm)")
    ap.add_argument("--top", type=int, default=15, help="source blocks listed per spec")
    ap.add_argument("--json", default=None,
                    help='write {"arch": ..., "sizes": {spec name: {entry: bytes}}, "by_source": {spec name: '
                         '[[label, instructions], ...]}} here')
    a = ap.parse_args(argv)
    if a.by_source < 0:
        raise SystemExit(f"--by-source: expected a line count >= 1 (or 0: off), got {a.by_source}")
    if a.top < 1:
        raise SystemExit(f"--top: expected at least 1, got {a.top}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sass_loop

    rows, by_source = {}, {}
    specs = [sass_loop._spec(text) for text in a.specs.split(",")]  # every text checked before compiling
    for spec in specs:
        sizes = spec_sizes(spec, a.arch)
        rows[spec.name] = sizes
        print(f"{spec.name:52s} attention {sizes['attention']:7d} B  combine {sizes['combine']:7d} B  "
              f"dump {sizes['dump']:6d} B", flush=True)
        if a.by_source:
            blocks = _by_source(spec, a.arch, a.by_source)
            by_source[spec.name] = blocks
            total = sum(n for _, n in blocks)
            for label, n in blocks[:a.top]:
                print(f"    {n:6d} instructions {n / total:6.1%}  {label}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "sizes": rows, "by_source": by_source}, f, indent=1)


if __name__ == "__main__":
    main()

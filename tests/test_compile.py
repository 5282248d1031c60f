"""Every shipped kernel spec compiles through NVRTC for sm_80 and sm_90,
without a GPU, with no register spills and within the shared-memory limit."""

import concurrent.futures
import ctypes
import multiprocessing
import os
import re
import sys

import numpy as np
import pytest

from cupy_lean import kernels as K

SPECS = K.shipped_specs()
ARCHS = ("sm_80", "sm_90")


def _nvrtc_available():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


NVRTC = _nvrtc_available()
REQUIRED = os.environ.get("CUPY_LEAN_REQUIRE_NVRTC") == "1"  # set by CI: there, no skipping
needs_nvrtc = pytest.mark.skipif(
    not NVRTC and not REQUIRED,
    reason="NVRTC not found (CuPy and its NVRTC wheel: pip install -e '.[cuda13]' or '.[cuda12]')")


def test_nvrtc_is_installed_where_required():
    if REQUIRED:
        assert NVRTC, "CUPY_LEAN_REQUIRE_NVRTC=1 but NVRTC was not found"


def _compile_one(job):
    spec, arch = job
    log = []
    try:
        cubin = K.compile_cubin(spec, arch, log=log)
    except Exception as exc:  # reported by the test of that spec
        return None, f"{type(exc).__name__}: {exc}"
    return cubin, log[0]


@pytest.fixture(scope="module")
def compiled():
    """Every (spec, arch) compiled once, on all cores (NVRTC is CPU-bound and
    the specs are independent): the compile tests then only inspect."""
    jobs = [(spec, arch) for spec in SPECS for arch in ARCHS]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    if workers == 1:
        results = list(map(_compile_one, jobs))
    else:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_compile_one, jobs, chunksize=1))
    return dict(zip(jobs, results))


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_compiles(spec, arch, compiled):
    cubin, text = compiled[(spec, arch)]
    assert cubin is not None, text
    assert cubin[:4] == b"\x7fELF"
    assert spec.entry.encode() in cubin and spec.combine_entry.encode() in cubin
    assert spec.dump_entry.encode() in cubin
    # ptxas report. Spills are bounded per family (measured with NVRTC 13.x):
    # nothing or a few words at head_dim 64 and 128; at head_dim 256 (128
    # accumulator registers per thread) up to ~210 bytes, outside the tile
    # loop (the segment prologue and setup, checked in the SASS). A
    # regression past these limits fails.
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    assert spills, text
    limit = 256 if spec.head_dim == 256 else (128 if arch == "sm_80" else 64)
    assert max(spills) <= limit, text
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    assert regs and max(regs) <= 255
    assert spec.smem_bytes <= 227 * 1024


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_util_module_compiles(arch):
    cubin = K.compile_cubin(None, arch)
    for name in (b"merge_states_f16", b"merge_states_bf16", b"merge_states_f32", b"lean_check_inputs",
                 b"lean_pair_heads"):
        assert name in cubin


def test_spec_names_are_unique_and_from_parameters():
    names = [s.name for s in SPECS]
    assert len(set(names)) == len(names)
    s = K.make_spec("bf16", 128, 4, True)
    assert s.name.startswith("lean_bf16_d128_m1_") and s.name.endswith("_paged")


def test_options_carry_source_hash():
    opts = K.compile_options(K.make_spec("f16", 64, 1, False))
    assert any(o == f"-DLEAN_SRC_HASH={K.source_hash()}" for o in opts)


@pytest.mark.parametrize("group,mt", [(1, 1), (16, 1), (17, 2), (32, 2), (33, 4), (100, 8), (128, 8)])
def test_group_to_query_tiles(group, mt):
    assert K.make_spec("f16", 128, group, False).m_tiles == mt


@pytest.mark.parametrize("bad", [(63, 4), (128, 0), (128, 129)])
def test_make_spec_rejects(bad):
    d, g = bad
    with pytest.raises(ValueError, match="head_dim|group"):
        K.make_spec("f16", d, g, False)


def test_fp8_wide_k_reads_switch_marks_fp8_specs_only():
    with K.tuning(fp8_wide_k_reads=True):
        assert K.make_spec("f16", 128, 8, False, features=K.FEATURES["fp8_e4m3"]).name.endswith("_fp8_e4m3_fp8_wide_k")
        assert not K.make_spec("f16", 128, 8, False).features & K.FEATURES["fp8_wide_k"]  # 16-bit K: no such read
    assert not K.make_spec("f16", 128, 8, False, features=K.FEATURES["fp8_e4m3"]).features & K.FEATURES["fp8_wide_k"]
    with pytest.raises(ValueError, match="features: the fp8_wide_k bit needs an fp8 bit, got 128"):
        K.make_spec("f16", 128, 8, False, features=K.FEATURES["fp8_wide_k"])


def test_head_lanes_bit_is_made_for_fp8_specs():
    assert K.make_spec("f16", 64, 8, False, features=16 | 256).name.endswith("_fp8_e4m3_head_lanes")
    with pytest.raises(ValueError, match="features: the head_lanes bit needs an fp8 bit, got 256"):
        K.make_spec("f16", 64, 8, False, features=K.FEATURES["head_lanes"])


def test_head_lanes_rule():
    """Which calls run their heads as lanes, and how many: fp8 at head_dim 64
    whose neighbouring heads' rows are adjacent (NHD), two heads or more, lean
    without a stream-K option, not batch-invariant; the count divides the
    heads and leaves at most a tenth of the SMs idle, the smallest of at
    least 8 lanes, else the largest."""
    nhd = lambda h, t=1: (t * h * 64, h * 64, 64, 1)  # (sequence, token, head, element) byte strides
    hnd = lambda h, t=100: (h * t * 64, 64, t * 64, 1)
    lanes = lambda h, **kw: K.head_lanes("e4m3", 64, h, nhd(h), nhd(h), **kw)
    assert K.head_lanes("e4m3", 64, 8, nhd(8, 100), nhd(8, 100)) == 8
    assert K.head_lanes("e5m2", 64, 2, nhd(2, 7), nhd(2, 7)) == 2
    assert K.head_lanes(None, 64, 8, nhd(8), nhd(8)) == 1  # 16-bit rows are whole lines
    assert K.head_lanes("e4m3", 128, 8, (0, 1024, 128, 1), (0, 1024, 128, 1)) == 1  # 128-byte rows
    assert K.head_lanes("e4m3", 64, 8, hnd(8), hnd(8)) == 1  # heads apart
    assert K.head_lanes("e4m3", 64, 8, nhd(8), hnd(8)) == 1  # V's heads apart
    assert lanes(1) == 1
    # a divisor whose lanes keep 90% of the SMs busy: the smallest of 8 or more, else the largest
    assert [lanes(h) for h in (2, 3, 4, 6, 8, 12, 13, 17, 21, 25)] == [2, 3, 4, 6, 8, 12, 13, 17, 21, 25]
    assert lanes(27) == 9  # 27 lanes: 4 SMs each, 108 of 132; 9: 14 each, 126
    assert lanes(16) == 8 and lanes(32) == 8 and lanes(64) == 8 and lanes(15) == 15 and lanes(35) == 7
    assert lanes(17, sms=114) == 1 and lanes(34, sms=114) == 2  # 17 lanes of 6 SMs: 102 of 114
    assert lanes(37) == 1 and lanes(31) == 31  # primes: 37 lanes of 3 SMs (111); 31 of 4 (124)
    for kw in ({"schedule": "split"}, {"schedule": "head"}, {"stream_k_knob": True}, {"batch_invariant": True}):
        assert lanes(8, **kw) == 1, kw
    with K.tuning(fp8_head_lanes=False):
        assert lanes(8) == 1
    with K.tuning(fp8_head_lanes_count=3):
        assert lanes(27) == 3 and lanes(8) == 1
    with K.tuning(fp8_head_lanes_sm_fraction=0.8, fp8_head_lanes_group=10):
        assert lanes(27) == 27 and lanes(64) == 16 and lanes(8) == 8


def test_head_pairs_rule():
    """Which calls run in head pairs (kernels.pair_heads): fp8 at head_dim
    64, an even number of KV heads whose rows are adjacent in K and V, room
    for twice the query rows, lean with no option fixing its configuration,
    not batch-invariant, pages within TUNING's limit (dense caches: its
    switch)."""
    nhd = lambda h, t=1: (t * h * 64, h * 64, 64, 1)  # (sequence or page, token, head, element) byte strides
    hnd = lambda h, t=100: (h * t * 64, 64, t * 64, 1)
    with K.tuning(fp8_pair_heads_max_page=16, fp8_pair_heads_dense=False):
        pairs = lambda h, page=1, rows=4, **kw: K.pair_heads("e4m3", 64, h, rows, nhd(h, page), nhd(h, page), page,
                                                             **kw)
        assert pairs(2) and pairs(8) and pairs(8, page=16) and pairs(2, rows=64)
        assert K.pair_heads("e5m2", 64, 4, 8, nhd(4), nhd(4), 1)
        assert not pairs(8, page=32)  # pages over the limit
        assert not pairs(8, page=0)  # dense: the switch is off
        assert not pairs(3) and not pairs(1)  # an odd count
        assert not pairs(2, rows=65)  # 130 query rows a pair: over MAX_GROUP
        assert not K.pair_heads(None, 64, 8, 4, nhd(8), nhd(8), 1)  # 16-bit rows are whole lines
        assert not K.pair_heads("e4m3", 128, 8, 4, (0, 1024, 128, 1), (0, 1024, 128, 1), 1)
        assert not K.pair_heads("e4m3", 64, 8, 4, hnd(8, 16), hnd(8, 16), 16)  # heads apart
        assert not K.pair_heads("e4m3", 64, 8, 4, nhd(8, 16), hnd(8, 16), 16)  # V's heads apart
        assert K.pair_heads("e4m3", 64, 8, 4, (512, 64, 64, 1), (512, 64, 64, 1), 1)  # HND pages of one token
        for kw in ({"schedule": "split"}, {"schedule": "head"}, {"knobs": True}, {"batch_invariant": True}):
            assert not pairs(8, **kw), kw
    with K.tuning(fp8_pair_heads_max_page=0, fp8_pair_heads_dense=True):
        assert not pairs(8, page=1) and pairs(8, page=0)
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="fp8_pair_heads_max_page"):
            K.TUNING["fp8_pair_heads_max_page"] = bad


def test_head_pairs_views_and_rows():
    """The K / V layout a call in head pairs reads (two heads of 64 as one of
    128, no copy), the row arguments of the padding / unpairing kernel
    (element strides of any layout), and the scales a paired plan takes
    (one value for every head: by value, None, or a GPU array of shape ())."""
    from cupy_lean import _plan as P

    # a paged cache (pages, 1, 6, 64) of uint8 and a dense one in a wider buffer
    assert P._paired_kv_meta(((10, 1, 6, 64), (384, 384, 64, 1))) == ((10, 1, 3, 128), (384, 384, 128, 1))
    assert P._paired_kv_meta(((2, 50, 4, 64), (51200, 1024, 64, 1))) == ((2, 50, 2, 128), (51200, 1024, 128, 1))
    q = np.zeros((3, 8, 64), np.float16)
    assert P._pair_rows(q.shape, q.strides, 2) == (24, 1, 8, 512, 0, 64, 1)
    q4 = np.zeros((3, 5, 8, 128), np.float16)[:, :, :, 32:96]  # 4-D, strided rows
    assert P._pair_rows(q4.shape, q4.strides, 2) == (120, 5, 8, 5120, 1024, 128, 1)
    qt = np.zeros((8, 3, 64), np.float16).transpose(1, 0, 2)  # heads-major
    assert P._pair_rows(qt.shape, qt.strides, 2) == (24, 1, 8, 64, 0, 192, 1)
    assert P._pair_rows((3, 8, 64), (1025, 128, 2), 2) is None  # a stride of no whole element: no pairs
    assert P._pair_rows((1, 8, 64), (1025, 128, 2), 2) == (8, 1, 8, 0, 0, 64, 1)  # (an axis of one: never used)
    assert type(P.gpu_fp8_scales(0.5, None, 4)) is P.UniformScales
    assert tuple(P.gpu_fp8_scales(None, 2.0, 4)) == (1.0, 2.0)
    assert type(P.gpu_fp8_scales(np.float32(0.5), 1.5, 4)) is P.UniformScales  # a host number: by value
    per_head = P.gpu_fp8_scales(np.full(4, 0.5), 1.5, 4)
    assert type(per_head) is tuple and per_head[0].shape == (4,)
    assert type(P.gpu_fp8_scales(np.full(1, 0.5), 1.5, 1)) is P.UniformScales  # one KV head


@needs_nvrtc
def test_head_lanes_take_one_params():
    """A head-lanes spec takes the one Params every spec takes (a lane finds
    its heads and workspace from the lane fields: its block index over
    Params.lanes by a multiply-high, which the dense plain fp8 spec has no
    use for), and divides no more than the plain one."""
    plain = K.compile_ptx(K.make_spec("f16", 64, 8, False, features=16), "sm_90")
    lanes = K.compile_ptx(K.make_spec("f16", 64, 8, False, features=16 | 256), "sm_90")

    def param_bytes(ptx):
        return int(re.search(r"\.entry \w+_attention\(\s*\.param \.align \d+ \.b8 \w+\[(\d+)\]", ptx).group(1))

    assert param_bytes(plain) == param_bytes(lanes) == ctypes.sizeof(K.Params)
    assert lanes.count("mul.hi.u32") > plain.count("mul.hi.u32") == 0
    assert [lanes.count(op) for op in ("div.u32", "rem.u32")] == [plain.count(op) for op in ("div.u32", "rem.u32")]


def test_make_spec_takes_both_dtype_names_and_refuses_others():
    # NumPy's names give the same spec as the short ones; any other name is
    # refused naming dtype (it once built a float16 kernel for "bfloat16")
    assert K.make_spec("bfloat16", 128, 4, False) == K.make_spec("bf16", 128, 4, False)
    assert K.make_spec("float16", 64, 8, True) == K.make_spec("f16", 64, 8, True)
    assert "-DLEAN_BF=1" in K.compile_options(K.make_spec("bfloat16", 128, 4, False))
    for bad in ("float32", "garbage", "fp16"):
        with pytest.raises(ValueError, match=f"dtype: expected one of .*got '{bad}'"):
            K.make_spec(bad, 128, 4, False)
        with pytest.raises(ValueError, match="dtype: expected"):
            K.Spec(bad, 128, 1, 64, 2, False)


def test_tile_override_and_limits():
    for t in K.TILE_SIZES:
        s = K.make_spec("f16", 128, 1, False, tile_size=t)
        assert s.tile == t and s.smem_bytes <= 227 * 1024
    with pytest.raises(ValueError, match="tile_size"):
        K.make_spec("f16", 128, 1, False, tile_size=48)


def test_params_struct_layout_reaches_the_compile():
    """The host's Params layout (every field's name and size in order, and
    the struct's size) and the spec's layouts go into the compile options,
    where the source static_asserts them."""
    import ctypes

    spec = K.make_spec("f16", 128, 8, True)
    opts = K.compile_options(spec)
    fields = next(o for o in opts if o.startswith("-DLEAN_HOST_PARAMS="))
    assert fields.count("{") == len(K.Params._fields_)
    assert fields.startswith('-DLEAN_HOST_PARAMS={"q",8},') and fields.endswith(f'{{"{K.Params._fields_[-1][0]}",{ctypes.sizeof(K.Params._fields_[-1][1])}}}')
    assert f"-DLEAN_HOST_PARAMS_SIZE={ctypes.sizeof(K.Params)}" in opts
    assert f"-DLEAN_HOST_SMEM_BYTES={spec.smem_bytes}" in opts
    assert f"-DLEAN_HOST_THREADS={spec.threads}" in opts
    # the pointer fields come first, and the pointer view writes them
    assert [n for n, _ in K.Params._fields_[:len(K.POINTER_FIELDS)]] == list(K.POINTER_FIELDS)
    p = K.Params()
    K.pointer_view(p)[:] = tuple(range(100, 110))
    assert (p.q, p.counters, p.unit_meta) == (100, 108, 109)


@needs_nvrtc
@pytest.mark.parametrize("field", ["params", "order", "smem", "threads"])
def test_layout_drift_fails_the_compile(field, monkeypatch):
    """A host layout that differs from the kernel's is a compile error that
    names the layout, not a wrong launch."""
    spec = K.make_spec("f16", 64, 1, False)
    real = K.compile_options

    def drifted(s):
        opts = list(real(s))
        if field == "params":
            opts = [o.replace('{"scale_log2",4}', '{"scale_log2",8}') if "HOST_PARAMS=" in o else o for o in opts]
        elif field == "order":
            opts = [o.replace('{"batch",4},{"heads_kv",4}', '{"heads_kv",4},{"batch",4}') if "HOST_PARAMS=" in o
                    else o for o in opts]
        elif field == "smem":
            opts = [f"-DLEAN_HOST_SMEM_BYTES={spec.smem_bytes + 16}" if "SMEM_BYTES" in o else o for o in opts]
        else:
            opts = [f"-DLEAN_HOST_THREADS={spec.threads * 2}" if "HOST_THREADS" in o else o for o in opts]
        return tuple(opts)

    assert K.compile_cubin(spec, "sm_90")[:4] == b"\x7fELF"  # compiles as it is
    monkeypatch.setattr(K, "compile_options", drifted)
    with pytest.raises(RuntimeError, match={"params": "Params: field names, order or sizes", "smem": "shared-memory layout",
                                            "order": "Params: field names, order or sizes",
                                            "threads": "warp layout"}[field]):
        K.compile_cubin(spec, "sm_90")


def test_decomposition_values():
    assert int(K.Decomposition.STREAM_K) == 0 and int(K.Decomposition.SPLIT_K) == 1
    opts = K.compile_options(K.make_spec("f16", 64, 1, False))
    assert "-DLEAN_HOST_STREAM_K=0" in opts and "-DLEAN_HOST_SPLIT_K=1" in opts


@pytest.mark.parametrize("ptr,strides,shape,n,ok", [
    (4096, (8192, 256, 2), (2, 32, 128), 16, True),
    (4098, (8192, 256, 2), (2, 32, 128), 16, False),   # pointer off by 2 bytes
    (4096, (8194, 256, 2), (2, 32, 128), 16, False),   # batch stride not a multiple of 16
    (4096, (8194, 256, 2), (1, 32, 128), 16, True),    # ... on an axis of length 1
    (4104, (8, 8, 2), (3, 4, 4), 8, True),
    (4100, (8, 8, 2), (3, 4, 4), 8, False),
])
def test_alignment_predicate(ptr, strides, shape, n, ok):
    from cupy_lean import _plan as P

    assert P._aligned_layout((shape, strides), ptr % n == 0, n) is ok


@pytest.mark.parametrize("arch", sorted(K.SMEM_OPTIN))
def test_default_configurations_fit_each_architecture(arch):
    """For the shared-memory limits of sm_80, sm_86, sm_89 and sm_90: every
    default configuration fits; where none can, the error names the limit."""
    limit = K.SMEM_OPTIN[arch]
    fitted = refused = 0
    for d in K.HEAD_DIMS:
        for mt in K.M_TILES:
            for paged in (False, True):
                try:
                    s = K.make_spec("bf16", d, mt * 16, paged, smem_limit=limit)
                except ValueError as exc:
                    assert f"limit of {limit} bytes" in str(exc) and "heads_q / heads_kv" in str(exc)
                    refused += 1
                    continue
                assert s.smem_bytes <= limit and s.stages >= 2
                fitted += 1
    assert fitted + refused == 3 * len(K.M_TILES) * 2
    # 99 KB parts (sm_86, sm_89) cannot hold group > 64 at head_dim 256; the others hold everything
    assert refused == (2 if K.SMEM_OPTIN[arch] < 128 * 1024 else 0)


def test_too_large_requests_name_the_limit():
    with pytest.raises(ValueError, match=r"tile_size: tile 128 with 2 stages needs \d+ bytes .*limit of 101376 bytes"):
        K.make_spec("f16", 256, 4, False, tile_size=128, smem_limit=K.SMEM_OPTIN["sm_86"])
    with pytest.raises(ValueError, match=r"stages: .*limit of 166912 bytes"):
        K.make_spec("f16", 128, 16, False, tile_size=128, stages=6, smem_limit=K.SMEM_OPTIN["sm_80"])
    with pytest.raises(ValueError, match=r"limit of 20000 bytes"):
        K.make_spec("f16", 128, 1, False, smem_limit=20000)


FEATURE_SPECS = [K.make_spec("f16", 64, 4, True, features=7), K.make_spec("bf16", 128, 32, False, features=7),
                 K.make_spec("f16", 256, 8, True, features=1), K.make_spec("f16", 128, 32, True, features=15),
                 K.make_spec("f16", 128, 8, True, features=16), K.make_spec("bf16", 256, 4, False, features=32 | 9),
                 K.make_spec("bf16", 64, 16, False, features=16 | 7),
                 K.make_spec("f16", 256, 12, True, page_size=1), K.make_spec("bf16", 64, 4, True, page_size=3),
                 K.make_spec("f16", 64, 20, True, features=16, page_size=1),
                 K.make_spec("f16", 128, 8, True, tile_size=16, page_size=16),
                 # the wide fp8 K reads (TUNING["fp8_wide_k_reads"]) at each head_dim
                 K.make_spec("bf16", 64, 8, True, features=16 | 128), K.make_spec("f16", 128, 40, False, features=32 | 128),
                 K.make_spec("bf16", 256, 4, True, features=16 | 128 | 15),
                 # head lanes (kernels.head_lanes): a lane's CTAs, heads and workspace
                 K.make_spec("f16", 64, 8, False, features=16 | 256), K.make_spec("bf16", 64, 4, True, features=32 | 256 | 15),
                 K.make_spec("f16", 64, 3, True, features=16 | 256, page_size=1)]


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", FEATURE_SPECS, ids=[s.name for s in FEATURE_SPECS])
def test_feature_specs_compile(spec, arch):
    """Specs with sinks, soft-cap, sliding window, query tokens, fp8 and
    per-row page reads compiled in (and a tiny tile with a run of 2 rows)."""
    log = []
    cubin = K.compile_cubin(spec, arch, log=log)
    extra = "".join(f"_{n}" for n, bit in K.FEATURES.items() if spec.features & bit)
    assert spec.entry.encode() in cubin and spec.name.endswith(("_paged" if spec.paged else "_dense") + extra)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log[0])]
    assert spills and max(spills) <= 512, log[0]


FP8_FRAME_SPECS = [K.make_spec("f16", d, 8, paged, t, features=K.FEATURES["fp8_e4m3"])
                   for d in (64, 128, 256) for paged, t in ((False, None), (True, 64))]


@needs_nvrtc
@pytest.mark.parametrize("spec", FP8_FRAME_SPECS, ids=[s.name for s in FP8_FRAME_SPECS])
def test_fp8_specs_have_no_stack_frame(spec):
    """The fp8 kernels keep their accumulator in registers (sm_90): no entry
    has a stack frame. A loop over accumulator pairs that the compiler does
    not unroll (the segment store's float4 loop, written with bounds that
    start at the pass, did not at head_dim 256) indexes the array at run
    time and moves it to local memory: a 528-568-byte frame that the spill
    limits above let through."""
    cubin, text = _compile_one((spec, "sm_90"))
    frames = [int(x) for x in re.findall(r"(\d+) bytes stack frame", text)]
    assert cubin is not None and frames and max(frames) == 0, text


def test_fp8_specs_hold_bytes_in_the_ring():
    """An fp8 spec's ring holds K/V as bytes (the MMAs read them there; the
    segment store merges its warps through a consumed stage in two column
    passes): half the ring of the fp16 spec of the same tile and stages. The
    default fp8 spec keeps its fp16 twin's tile and stages
    (TUNING["fp8_stage_factor"] 1); factor 2 gives it more stages, up to
    twice as many, as many as fit TUNING["max_smem"]."""
    for d, tile, stages in ((64, 128, 4), (128, 128, 3), (256, 64, 2)):
        plain = K.Spec("f16", d, 1, tile, stages, False)
        for bit in K.FP8_FEATURES.values():
            fp8 = K.Spec("f16", d, 1, tile, stages, False, bit)
            assert fp8.smem_bytes == plain.smem_bytes - stages * 2 * tile * d
    for d in (64, 128, 256):
        for paged in (False, True):
            plain = K.make_spec("f16", d, 8, paged)
            fp8 = K.make_spec("f16", d, 8, paged, features=K.FEATURES["fp8_e4m3"])
            assert fp8.tile == plain.tile and fp8.stages == plain.stages, (fp8.name, plain.name)
            with K.tuning(fp8_stage_factor=2):  # up to twice the 16-bit depth, as many as fit max_smem
                deep = K.make_spec("f16", d, 8, paged, features=K.FEATURES["fp8_e4m3"])
            assert deep.tile == plain.tile and plain.stages < deep.stages <= min(6, 2 * plain.stages), deep.name
            assert deep.smem_bytes <= K.TUNING["max_smem"], deep.name
            if deep.stages < min(6, 2 * plain.stages):
                more = K.Spec("f16", d, deep.m_tiles, deep.tile, deep.stages + 1, paged, deep.features)
                assert more.smem_bytes > K.TUNING["max_smem"], deep.name


def test_feature_bits_name_the_spec():
    assert K.make_spec("f16", 128, 8, False).name.endswith("_dense")
    assert K.make_spec("f16", 128, 8, False, features=K.FEATURES["window"]).name.endswith("_dense_window")
    assert "-DLEAN_FEATURES=3" in K.compile_options(K.make_spec("f16", 128, 8, False, features=3))


@needs_nvrtc
def test_fp8_conversion_path_per_architecture(monkeypatch):
    """e4m3 K/V: sm_90 converts with the hardware instruction, sm_80 moves
    bits; FP8_BITMOVES_ENV compiles the bit moves for sm_90 too (so a newer
    GPU can test that path), and leaves non-fp8 specs alone."""
    spec = K.make_spec("f16", 64, 20, True, features=K.FEATURES["fp8_e4m3"])

    def ptx(arch):
        return K.compile_ptx(spec, "sm_" + arch[len("compute_"):])

    monkeypatch.delenv(K.FP8_BITMOVES_ENV, raising=False)
    assert "cvt.rn.f16x2.e4m3x2" in ptx("compute_90")
    assert "cvt.rn.f16x2.e4m3x2" not in ptx("compute_80")
    monkeypatch.setenv(K.FP8_BITMOVES_ENV, "1")
    assert "-DLEAN_FP8_BITMOVES=1" in K.compile_options(spec)
    assert "-DLEAN_FP8_BITMOVES=1" not in K.compile_options(K.make_spec("f16", 64, 20, True))
    assert "cvt.rn.f16x2.e4m3x2" not in ptx("compute_90")


@needs_nvrtc
@pytest.mark.parametrize("paged", [False, True])
def test_split_prefetch_only_on_sm90(paged):
    """The launch-time split's L2 prefetch (TUNING["split_prefetch"]) is in
    the sm_90 kernel, by lines and by bulk prefetches, and not in the sm_80
    one (measured on sm_90 only; older GPUs ignore the Params field)."""
    spec = K.make_spec("f16", 128, 4, paged)
    ptx90, ptx80 = K.compile_ptx(spec, "sm_90"), K.compile_ptx(spec, "sm_80")
    assert "prefetch.global.L2" in ptx90 and "cp.async.bulk.prefetch.L2.global" in ptx90
    assert "prefetch" not in ptx80
    assert "split_prefetch" in [name for name, _ in K.Params._fields_]
    assert K.TUNING["split_prefetch"] in (0, 1, 2) and K.TUNING["split_prefetch_paged"] in (0, 1, 2)


@needs_nvrtc
def test_timeline_instrumentation_compiles(monkeypatch):
    """tools/timeline.py compiles the kernel with -DLEAN_TIMELINE: the
    stamps must keep compiling (and define the table the tool reads), while
    the plain specs carry none of them."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "timeline.py"
    spec_ = importlib.util.spec_from_file_location("lean_timeline_tool", path)
    tool = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tool)
    spec = K.make_spec("f16", 128, 8, True)
    plain = K.compile_cubin(spec, "sm_90")
    monkeypatch.setattr(K, "compile_options", K.compile_options)  # restored after the test
    tool.instrument()
    assert any(o.startswith("-DLEAN_TIMELINE=") for o in K.compile_options(spec))
    stamped = K.compile_cubin(spec, "sm_90")
    assert b"lean_timeline" in stamped and b"lean_timeline" not in plain
    assert b"lean_ctimeline" in stamped and b"lean_ctimeline" not in plain  # the combine launch's stamps


def test_hbm_bytes_per_us():
    """Memory clock (kHz) x 2 x bus width: the H200 measured on reports
    3134.3 MHz on 6144 bits (4.81 TB/s); without both, the TUNING fallback."""
    assert K.hbm_bytes_per_us({"MemoryClockRate": 3134313, "GlobalMemoryBusWidth": 6144}) == 3134313 * 1536 / 1e3
    fallback = K.TUNING["fallback_hbm_tbps"] * 1e6
    assert K.hbm_bytes_per_us({}) == fallback
    assert K.hbm_bytes_per_us({"MemoryClockRate": 0, "GlobalMemoryBusWidth": 6144}) == fallback
    assert K.hbm_bytes_per_us({"MemoryClockRate": 2619000, "GlobalMemoryBusWidth": None}) == fallback


@pytest.mark.parametrize("d,group,fp8", [(64, 4, False), (128, 8, False), (256, 12, False), (256, 40, False),
                                         (64, 20, True), (128, 8, True)])
def test_page_rows_feature_from_the_page_size(d, group, fp8):
    """A paged spec reads the block table once per loader run of rows when
    the run divides the page size, else per row (page_rows); the run is the
    tile's rows over the rows one pass of the block covers, never below 1."""
    feats = K.FEATURES["fp8_e4m3"] if fp8 else 0
    base = K.make_spec("f16", d, group, True, features=feats)
    kcpr = d * (1 if fp8 else 2) // 16
    assert base.run_rows == max(1, base.tile // (base.threads // kcpr))
    for ps in (1, 2, 3, 7, 8, 12, 16, 48, 64, 256):
        spec = K.make_spec("f16", d, group, True, features=feats, page_size=ps)
        rows = ps % base.run_rows != 0
        assert bool(spec.features & K.FEATURES["page_rows"]) == rows, (ps, base.run_rows)
        assert spec.name.endswith("_page_rows") == rows
        assert (spec.tile, spec.stages, spec.smem_bytes) == (base.tile, base.stages, base.smem_bytes)
    assert K.make_spec("f16", d, group, False, features=feats, page_size=1).features == feats  # dense: no rows
    win = K.make_spec("f16", d, group, True, features=feats | K.FEATURES["window"], page_size=64)
    assert win.features & K.FEATURES["page_rows"]  # a window starts tiles anywhere: always per row
    assert f"-DLEAN_HOST_RUN_ROWS={base.run_rows}" in K.compile_options(base)


def test_varied_length_tile_rule():
    """Several sequences of lengths the plan cannot see: tile 64 at head_dim
    64 with up to 16 query rows and no optional feature
    (TUNING["varied_lengths_d64_tile"]; 0 turns the rule off) where two
    such CTAs fit an SM, None otherwise; the tile fits with the stages a tile override gets, dense and
    paged, and the paged spec is among the shipped ones."""
    f = K.varied_length_tile
    assert K.TUNING["varied_lengths_d64_tile"] == 64
    for group in (1, 7, 16):
        assert f(64, group) == 64 and f(64, group, 0) == 64
    for args in ((128, 8), (256, 4), (96, 8), (64, 17), (64, 32), (64, 8, K.FEATURES["sinks"]),
                 (64, 8, K.FEATURES["softcap"]), (64, 8, K.FEATURES["window"]), (64, 8, K.FEATURES["qlen"]),
                 (64, 8, K.FEATURES["fp8_e4m3"])):
        assert f(*args) is None, args
    asked = []

    def occupancy(tile):  # a GPU of ~100 KB of shared memory per SM: one such CTA
        asked.append(tile)
        return 1

    assert f(64, 8, 0, occupancy) is None and asked == [64]
    assert f(64, 8, 0, lambda tile: 3) == 64
    saved = dict(K.TUNING)
    try:
        K.TUNING["varied_lengths_d64_tile"] = 0
        assert f(64, 8) is None
    finally:
        K.TUNING.update(saved)
    for paged in (False, True):
        spec = K.make_spec("f16", 64, 16, paged, tile_size=64)
        assert spec.tile == 64 and spec.threads == 128 and spec.smem_bytes <= K.TUNING["one_cta_per_sm_above"]
    assert K.make_spec("bf16", 64, 16, True, tile_size=64) in K.shipped_specs()


def test_many_unit_config_rule():
    """Dense calls of equal lengths, at least one unit per SM, groups up to
    16, no feature: at head_dim 64 one CTA per unit, at tile 64 up to
    TUNING["many_units_d64_t64_per_sm"] units per SM and tile 32 above, while
    one wave of resident CTAs holds the units and no stream-K option is
    given; otherwise 32-token tiles up to TUNING["short_unit_tokens"] (the
    variant model chooses the decomposition); anything else: the default
    (None)."""
    lim, per = K.TUNING["short_unit_tokens"], K.TUNING["many_units_d64_t64_per_sm"]
    assert lim > 0 and per >= 1 and K.TUNING["many_units_d64"]
    ok = dict(head_dim=128, group=8, units=280, tokens=559, num_sms=132, paged=False, uniform=True, features=0)
    f = K.many_unit_config

    def never(tile):
        raise AssertionError("occupancy asked outside the head_dim 64 rule")

    assert f(**ok, occupancy=never) == (32, False)
    assert f(**{**ok, "group": 16, "units": 132, "tokens": lim}, occupancy=never) == (32, False)
    d64 = {**ok, "head_dim": 64}
    assert f(**d64) == (32, True)
    for tokens in (1, lim, lim + 1, 2049, 100_001):  # the length does not choose at head_dim 64
        assert f(**{**d64, "tokens": tokens, "units": per * 132}) == (64, True)
        assert f(**{**d64, "tokens": tokens, "units": per * 132 + 1}) == (32, True)
    asked = []
    occ = {32: 5, 64: 3}

    def occupancy(tile):
        asked.append(tile)
        return occ[tile]

    assert f(**{**d64, "units": 660}, occupancy=occupancy) == (32, True) and asked == [32]
    assert f(**{**d64, "units": 132}, occupancy=occupancy) == (64, True) and asked[-1] == 64
    # more units than one wave of resident CTAs: the short rule, else the default
    assert f(**{**d64, "units": 661}, occupancy=occupancy) == (32, False)
    assert f(**{**d64, "units": 661, "tokens": lim + 1}, occupancy=occupancy) is None
    occ[64] = 1  # a device where one tile-64 CTA fits per SM
    assert f(**{**d64, "units": 133, "tokens": lim + 1}, occupancy=occupancy) is None
    # a stream-K option given: no CTA per unit, the short rule only
    assert f(**d64, one_cta_per_unit=False) == (32, False)
    assert f(**{**d64, "tokens": lim + 1}, one_cta_per_unit=False) is None
    for change in ({"head_dim": 256}, {"head_dim": 96}, {"group": 17}, {"units": 131}, {"tokens": lim + 1},
                   {"tokens": 0}, {"paged": True}, {"uniform": False}, {"features": K.FEATURES["sinks"]},
                   {"features": K.FEATURES["fp8_e4m3"]}, {"head_dim": 64, "units": 131},
                   {"head_dim": 64, "paged": True}, {"head_dim": 64, "uniform": False},
                   {"head_dim": 64, "features": K.FEATURES["window"]},
                   {"head_dim": 64, "features": K.FEATURES["qlen"]}, {"head_dim": 64, "group": 17}):
        assert f(**{**ok, **change}, occupancy=never if change.get("head_dim") != 64 else None) is None, change
    saved = dict(K.TUNING)
    try:
        K.TUNING["short_unit_tokens"] = 0
        assert f(**ok) is None
        assert f(**d64) == (32, True)
        K.TUNING["short_unit_tokens"], K.TUNING["many_units_d64"] = lim, False
        assert f(**d64) == (32, False)
        assert f(**{**d64, "tokens": lim + 1}) is None
    finally:
        K.TUNING.update(saved)
    # the tiles it asks for fit every head_dim they apply to, with the stages a tile override gets
    for d, tile in ((64, 32), (64, 64), (128, 32)):
        spec = K.make_spec("f16", d, 16, False, tile_size=tile)
        assert spec.tile == tile and spec.smem_bytes <= K.SMEM_OPTIN["sm_80"]


def test_config_rules_with_features_switch():
    """TUNING["config_rules_with_features"] (off by default) lets calls with
    optional features take the many-unit and varied-length tiles; the specs
    those tiles give with each feature build, dense and paged, and compile
    for sm_90."""
    assert K.TUNING["config_rules_with_features"] is False
    ok = dict(head_dim=64, group=8, units=280, tokens=559, num_sms=132, paged=False, uniform=True)
    feats = [K.FEATURES[n] for n in ("sinks", "softcap", "window", "qlen", "fp8_e4m3", "fp8_e5m2")]
    feats.append(K.FEATURES["sinks"] | K.FEATURES["window"] | K.FEATURES["fp8_e4m3"])
    fp8 = {K.FEATURES["fp8_e4m3"], K.FEATURES["fp8_e5m2"]}
    for b in feats:
        # an fp8 cache alone takes the head_dim-64 rule (TUNING["many_units_d64_with_fp8"]), nothing else does
        assert K.many_unit_config(**ok, features=b) == ((32, True) if b in fp8 else None)
        assert K.varied_length_tile(64, 8, b) is None
        assert K.many_unit_config(**{**ok, "head_dim": 128}, features=b) is None  # not the short-unit rule
        # TUNING["fp8_varied_lengths_tile"]: the varied-length tile for an fp8 cache (with lanes too) alone,
        # "paged" (the default): paged caches only; True: ragged ones too; False: none
        want = 64 if b in fp8 else None
        lanes = b | K.FEATURES["head_lanes"]
        assert K.TUNING["fp8_varied_lengths_tile"] == "paged"
        assert K.varied_length_tile(64, 8, b, paged=True) == want
        assert K.varied_length_tile(64, 8, lanes, paged=True) == (want if b & K.FP8_BITS else None)
        assert K.varied_length_tile(64, 8, b, paged=False) is None
        assert K.varied_length_tile(128, 8, b, paged=True) is None and K.varied_length_tile(64, 17, b, paged=True) is None
        assert K.varied_length_tile(64, 8, b, lambda t: 1, paged=True) is None  # two CTAs must fit an SM
        with K.tuning(fp8_varied_lengths_tile=True):
            for paged in (False, True):
                assert K.varied_length_tile(64, 8, b, paged=paged) == want
                assert K.varied_length_tile(64, 8, lanes, paged=paged) == (want if b & K.FP8_BITS else None)
        with K.tuning(fp8_varied_lengths_tile=False):
            assert K.varied_length_tile(64, 8, b, paged=True) is None
        with pytest.raises(ValueError, match="fp8_varied_lengths_tile.*'ragged'"):  # refused where it is set
            with K.tuning(fp8_varied_lengths_tile="ragged"):
                pass
        assert K.TUNING["fp8_varied_lengths_tile"] == "paged"
    saved = dict(K.TUNING)
    try:
        K.TUNING["config_rules_with_features"] = True
        for b in feats:
            assert K.many_unit_config(**ok, features=b) == K.many_unit_config(**ok, features=0) == (32, True)
            assert K.many_unit_config(**{**ok, "head_dim": 128}, features=b) == (32, False)
            assert K.varied_length_tile(64, 8, b) == 64
            for d, tile, paged in ((64, 32, False), (64, 64, False), (64, 64, True), (128, 32, False)):
                spec = K.make_spec("f16", d, 16, paged, tile_size=tile, features=b,
                                   page_size=16 if paged else None)
                assert spec.tile == tile and spec.smem_bytes <= K.SMEM_OPTIN["sm_80"]
        for b in (feats[-1], K.FEATURES["qlen"] | K.FEATURES["fp8_e5m2"]):
            assert K.compile_cubin(K.make_spec("bf16", 64, 16, True, tile_size=64, features=b, page_size=16), "sm_90")
    finally:
        K.TUNING.update(saved)
    assert K.TUNING["config_rules_with_features"] is False


def test_many_units_d64_with_fp8_rule():
    """TUNING["many_units_d64_with_fp8"] (on by default): a dense head_dim-64
    call of equal lengths and at least one unit per SM whose only optional
    feature is an fp8 cache (either format, with or without the wide K
    reads) runs one CTA per unit at 64-token tiles up to two units per SM and
    32-token tiles above, as a 16-bit call does; fp8 with any other feature,
    a paged or ragged fp8 call, units of more than
    TUNING["many_units_d64_fp8_max_unit_bytes"] of K and V and head_dim 128
    (the short-unit rule) keep the default tile, and so does the
    varied-length rule for a ragged fp8 call (a paged one takes 64 tokens,
    test_config_rules_with_features_switch). Off, every fp8 call does. The
    specs the rule gives build within the sm_80 limit and compile for sm_80
    and sm_90."""
    e4, e5, wide = K.FEATURES["fp8_e4m3"], K.FEATURES["fp8_e5m2"], K.FEATURES["fp8_wide_k"]
    ok = dict(head_dim=64, group=8, tokens=1237, num_sms=132, paged=False, uniform=True)
    assert K.TUNING["many_units_d64_with_fp8"] is True
    for b in (e4, e5, e4 | wide):
        assert K.many_unit_config(**ok, units=200, features=b) == (64, True)
        assert K.many_unit_config(**ok, units=300, features=b) == (32, True)
        assert K.many_unit_config(**ok, units=131, features=b) is None  # fewer units than SMs
        assert K.many_unit_config(**{**ok, "paged": True}, units=300, features=b) is None
        assert K.many_unit_config(**{**ok, "uniform": False}, units=300, features=b) is None
        assert K.many_unit_config(**ok, units=300, features=b, one_cta_per_unit=False) is None
        assert K.many_unit_config(**{**ok, "tokens": 300}, units=300, features=b, one_cta_per_unit=False) is None
        assert K.many_unit_config(**{**ok, "head_dim": 128, "tokens": 300}, units=300, features=b) is None
        assert K.varied_length_tile(64, 8, b, paged=False) is None
        # units of more K and V bytes than the cap keep the default tile (1 byte an element)
        cap = K.TUNING["many_units_d64_fp8_max_unit_bytes"]
        assert K.many_unit_config(**{**ok, "tokens": cap // 128}, units=300, features=b) == (32, True)
        assert K.many_unit_config(**{**ok, "tokens": cap // 128 + 1}, units=300, features=b) is None
        assert K.many_unit_config(**{**ok, "tokens": cap // 128 + 1}, units=300, features=0) == (32, True)
        # the occupancy still bounds it: a wave of 2 tile-32 CTAs per SM cannot hold 300 units
        assert K.many_unit_config(**ok, units=300, features=b, occupancy=lambda t: 2) is None
    for other in ("sinks", "softcap", "window", "qlen", "page_rows"):
        assert K.many_unit_config(**ok, units=300, features=e4 | K.FEATURES[other]) is None
    saved = dict(K.TUNING)
    try:
        K.TUNING["many_units_d64_with_fp8"] = False
        assert K.many_unit_config(**ok, units=300, features=e4) is None
        assert K.many_unit_config(**ok, units=300, features=0) == (32, True)  # 16-bit calls keep their rule
    finally:
        K.TUNING.update(saved)
    for dtype, b in (("f16", e4), ("bf16", e5)):
        for tile in (32, 64):
            spec = K.make_spec(dtype, 64, 8, False, tile_size=tile, features=b)
            assert spec.tile == tile and spec.fp8 and spec.smem_bytes <= K.SMEM_OPTIN["sm_80"]
            for arch in ("sm_80", "sm_90"):
                assert K.compile_cubin(spec, arch)


def _entry_bodies(ptx):
    """``{entry name: its PTX text}`` of a module's PTX."""
    parts = re.split(r"\.visible \.entry ", ptx)[1:]
    return {p.split("(", 1)[0].strip(): p for p in parts}


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_programmatic_launch_waits_before_any_memory_access(arch):
    """sm_90: the attention and combine entries (launched there with
    programmatic dependent launch, so they may start during the previous
    kernel) wait for the previous kernel before their first global load,
    store or atomic, and trigger no early launch of the next kernel (its
    CTAs would take the first freed slots unevenly); sm_80 has neither
    instruction."""
    spec = K.make_spec("f16", 128, 8, True, features=K.FEATURES["sinks"])
    bodies = _entry_bodies(K.compile_ptx(spec, arch))
    for entry in (spec.entry, spec.combine_entry):
        body = bodies[entry]
        if arch == "sm_80":
            assert "griddepcontrol" not in body
            continue
        wait = body.find("griddepcontrol.wait")
        assert "griddepcontrol.launch_dependents" not in body, entry
        access = [i for i in (body.find(op) for op in ("ld.global", "st.global", "atom.global", "red.global",
                                                       "cp.async")) if i >= 0]
        assert wait >= 0, entry
        assert access and wait < min(access), entry


def test_launch_config_struct_matches_cuda_h():
    """The ctypes mirror of CUlaunchConfig / CUlaunchAttribute (cuda.h) that
    the programmatic launches pass to cuLaunchKernelEx."""
    import ctypes

    from cupy_lean import _launch as L

    assert ctypes.sizeof(L._AttrValue) == 64
    assert ctypes.sizeof(L._Attr) == 72 and L._Attr.value.offset == 8
    assert [getattr(L._Config, f).offset for f in ("sharedMemBytes", "hStream", "attrs", "numAttrs")] == [24, 32, 40, 48]
    assert ctypes.sizeof(L._Config) == 56
    assert L._PROGRAMMATIC_STREAM_SERIALIZATION == 6


def test_index_divisor_divides_every_index():
    """kernels.index_divisor: the kernel's divide-free token / page_size and
    block / lanes, for every page size the GPU takes (and lane count, at
    most the SMs), exhaustively below 2^20 and at 20000 random and edge
    indices up to 2^31 - 1."""
    rng = np.random.default_rng(3)
    small = np.arange(1 << 20, dtype=np.uint64)
    big = np.concatenate([rng.integers(0, 2 ** 31, 20000, dtype=np.uint64),
                          np.arange(2 ** 31 - 4096, 2 ** 31, dtype=np.uint64)])
    for d in range(1, K.MAX_PAGE_SIZE + 1):
        magic, shift = K.index_divisor(d)
        assert 0 < magic < 2 ** 32
        for n in (small, big):
            got = (((n * np.uint64(magic)) >> np.uint64(32)) + n) >> np.uint64(shift)
            assert np.array_equal(got, n // np.uint64(d)), d
    with pytest.raises(ValueError, match="page_size: expected an integer >= 1, got 0"):
        K.index_divisor(0)
    with pytest.raises(ValueError, match="lanes: expected an integer >= 1, got 0"):
        K.index_divisor(0, "lanes")
    for bad in (2.5, "x", True):  # 2.5 used to divide by 2
        with pytest.raises(TypeError, match="page_size: expected an integer >= 1, got"):
            K.index_divisor(bad)
    assert K.index_divisor(np.int32(16)) == K.index_divisor(16)


def test_a_tuning_change_names_other_plans():
    """Plans are cached per call signature and TUNING values: after a change
    a call finds no plan made before it (the change applies), and setting
    the values back finds those plans again."""
    from cupy_lean import _plan

    before = _plan.plan_key(0, "sig")
    pdl = K.TUNING["pdl"]
    with K.tuning(pdl=not pdl) as t:
        assert t["pdl"] is (not pdl) and _plan.plan_key(0, "sig") != before
    assert K.TUNING["pdl"] is pdl and _plan.plan_key(0, "sig") == before
    saved = dict(K.TUNING)
    try:
        K.TUNING["merge_launch_pieces"] += 1
        changed = _plan.plan_key(0, "sig")
        K.TUNING.update(saved)
        assert changed != before and _plan.plan_key(0, "sig") == before
    finally:
        K.TUNING.update(saved)


def test_tuning_survives_copies_and_pickling():
    import copy
    import pickle

    for other in (copy.deepcopy(K.TUNING), pickle.loads(pickle.dumps(K.TUNING)), copy.copy(K.TUNING)):
        assert dict(other) == dict(K.TUNING)
        other["pdl"] = not other["pdl"]  # a change to the copy names other items, not the package's
        assert other["pdl"] != K.TUNING["pdl"]


def test_tuning_refuses_an_unknown_key_and_changes_nothing():
    before = dict(K.TUNING)
    with pytest.raises(ValueError, match=r"tuning: unknown keys \['pdll'\]; TUNING has \[.*'pdl'"):
        with K.tuning(pdl=not K.TUNING["pdl"], pdll=False):
            pass
    assert dict(K.TUNING) == before


def test_tuning_refuses_setting_a_key_it_does_not_have():
    """A typo in an experiment's switch would change nothing: refused by
    item assignment, update, |= and setdefault, naming the key; nothing
    changes."""
    before, key = dict(K.TUNING), K.TUNING.key
    for change in (lambda t: t.__setitem__("pdll", False), lambda t: t.update(pdl=False, pdll=False),
                   lambda t: t.__ior__({"pdll": False}), lambda t: t.setdefault("pdll", False)):
        with pytest.raises(ValueError, match=r"TUNING: unknown keys \['pdll'\] \(nothing reads them\); "
                                             r"TUNING has \[.*'pdl'"):
            change(K.TUNING)
        assert dict(K.TUNING) == before and K.TUNING.key == key


def test_tuning_takes_unhashable_values():
    """An experiment may set a list: the key still follows the items."""
    from cupy_lean import _plan

    before = _plan.plan_key(0, "sig")
    table = {"64": [[1.0, 1.0]], "128": [[1.0, 1.0]], "256": [[1.0, 1.0]]}
    with K.tuning(partial_grid_time=table):
        changed = _plan.plan_key(0, "sig")
        assert changed != before
        K.TUNING["partial_grid_time"] = {k: [list(p) for p in v] for k, v in table.items()}  # the same items again: the same key
        assert _plan.plan_key(0, "sig") == changed
    assert _plan.plan_key(0, "sig") == before


def test_every_tuning_change_moves_the_key():
    """Each way of changing TUNING updates its key (and restoring the items
    restores it)."""
    from cupy_lean import _plan

    before = _plan.plan_key(0, "sig")
    saved = dict(K.TUNING)
    changes = [lambda t: t.update(pdl=not saved["pdl"]), lambda t: t.__setitem__("min_warps", 3),
               lambda t: (t.pop("min_warps"), t.setdefault("min_warps", 2)),
               lambda t: t.__ior__({"pdl": not saved["pdl"]}),
               lambda t: t.pop("pdl"), lambda t: t.__delitem__("pdl"), lambda t: t.popitem(), lambda t: t.clear()]
    try:
        for change in changes:
            change(K.TUNING)
            assert _plan.plan_key(0, "sig") != before, change
            K.TUNING.clear()
            K.TUNING.update(saved)
            assert _plan.plan_key(0, "sig") == before
    finally:
        K.TUNING.clear()
        K.TUNING.update(saved)


def test_tuning_refuses_a_value_its_reader_would_take_wrongly():
    """A value of the wrong type or range (a string for a switch, a float
    for a byte count, a fraction over 1) is refused where it is set, naming
    the key, what it takes and the value; nothing changes. Every default
    passes its own check, and values of the right kind are taken."""
    before, key = dict(K.TUNING), K.TUNING.key
    bad = {"runtime_split": ("False", 'True or False'), "kv_tile_bytes": ("32k", "an integer >= 1"),
           "max_smem": (216.5 * 1024, "an integer >= 0"), "pdl": (1, "True or False"),
           "read_fraction": (1.2, r"a number in \(0, 1\]"), "fp8_stage_factor": (0.5, "a number >= 1"),
           "split_prefetch": (3, "0, 1 or 2"), "fp8_head_lanes_count": (0, "None or an integer >= 1"),
           "varied_lengths_d64_tile": (40, "0 or a tile of 16 to 128 tokens"),
           "merge_balance": (float("nan"), "a number >= 0"), "uniform_model": (None, '"rates" or "saturation"'),
           "cta_stream_gbs": ({"64": -1.0}, "a dict from head_dims")}
    for name, (value, text) in bad.items():
        for change in (lambda t: t.__setitem__(name, value), lambda t: t.update({"min_warps": 4, name: value}),
                       lambda t: t.__ior__({name: value})):
            with pytest.raises(ValueError, match=rf'kernels.TUNING\["{name}"\] must be {text}.*, got '
                                                 + re.escape(repr(value))):
                change(K.TUNING)
            assert dict(K.TUNING) == before and K.TUNING.key == key
    good = {"runtime_split": np.bool_(False), "kv_tile_bytes": np.int64(16384), "read_fraction": 1,
            "fp8_stage_factor": 1.5, "fp8_head_lanes_count": 4, "varied_lengths_d64_tile": 0, "merge_balance": 0.5}
    with K.tuning(**good):
        assert all(K.TUNING[k] == v for k, v in good.items())
    assert dict(K.TUNING) == before
    for name, value in before.items():
        K._check_tuning_value(name, value)


def test_tuning_is_still_a_dict():
    """Experiments log TUNING with their results: it stays a dict (JSON)."""
    import json

    assert isinstance(K.TUNING, dict) and json.loads(json.dumps(K.TUNING)) == dict(K.TUNING)


def test_loaded_kernels_read_tuning_when_a_plan_asks():
    """The kernels stay loaded for the process; the CTAs per SM and the DRAM
    estimate a new plan takes from them follow TUNING changes made since."""
    kern = object.__new__(K._Kernels)  # what loading left: the spec, its occupancy, two device attributes
    kern.spec = K.make_spec("f16", 128, 8, False)
    kern.occupancy = 2
    kern._attrs = {"MemoryClockRate": None, "GlobalMemoryBusWidth": None}  # a driver that reports neither
    assert kern.spec.smem_bytes > 100 * 1024 and kern.ctas_per_sm == 1  # over one_cta_per_sm_above
    with K.tuning(one_cta_per_sm_above=1 << 30):
        assert kern.ctas_per_sm == 2
        with K.tuning(max_ctas_per_sm=1):
            assert kern.ctas_per_sm == 1
    assert kern.ctas_per_sm == 1
    assert kern.hbm_bytes_per_us == K.TUNING["fallback_hbm_tbps"] * 1e6
    with K.tuning(fallback_hbm_tbps=4.8):
        assert kern.hbm_bytes_per_us == 4.8e6
    kern._attrs = {"MemoryClockRate": 2_619_000, "GlobalMemoryBusWidth": 5120}  # an H100 SXM's
    assert abs(kern.hbm_bytes_per_us - 3.352e6) < 1e3


@needs_nvrtc
def test_tools_compile_with_the_options_the_package_compiles_with(monkeypatch):
    # compile_cubin / compile_ptx (the tools' and these tests' compiles) must
    # build what CuPy's RawModule builds for the package: RawModule compiles
    # unannotated functions (the kernels' local lambdas) as device code, and
    # NVRTC 13.0 refuses them without that option (13.5 accepts them).
    from cupy.cuda import nvrtc

    seen = []
    real = nvrtc.compileProgram

    def spy(prog, opts):
        seen.append(list(opts))
        return real(prog, opts)

    monkeypatch.setattr(nvrtc, "compileProgram", spy)
    spec = K.make_spec("f16", 64, 8, False)
    K.compile_ptx(spec, "sm_90")
    K.compile_cubin(None, "sm_80")
    assert len(seen) == 2
    for opts in seen:
        assert "--device-as-default-execution-space" in opts, opts


def test_compile_names_a_bad_arch_before_nvrtc():
    """compile_ptx / compile_cubin take 'sm_NN' (sm_80 or newer): another
    spelling or an older GPU is refused naming ``arch``, not sent to NVRTC
    mangled (``compute_pute_90``) or failing on a None."""
    spec = K.make_spec("f16", 128, 4, False)
    for bad in ("compute_90", "sm90", "90", None, 90):
        for fn in (K.compile_ptx, K.compile_cubin):
            with pytest.raises(ValueError, match=r"arch: expected a real architecture such as 'sm_80'"):
                fn(spec, bad)
    for old in ("sm_75", "sm_70"):
        with pytest.raises(ValueError, match=rf"arch: the kernels need sm_80 or newer .*got '{old}'"):
            K.compile_cubin(spec, old)
    assert K._arch_number("sm_90a") == "90a" and K._arch_number("sm_120") == "120"


def test_make_spec_names_a_bad_argument_before_nvrtc():
    """Values Config refuses are refused by make_spec too, naming the
    argument (not a spec named "d128.0" or "s0" that NVRTC then fails on)."""
    good = dict(dtype="f16", head_dim=128, group=4, paged=False)
    cases = [(dict(head_dim=128.0), TypeError, "head_dim: expected an integer >= 1, got 128.0"),
             (dict(group=4.5), TypeError, "group: expected an integer >= 1, got 4.5"),
             (dict(paged="no"), TypeError, "paged: expected True or False, got str 'no'"),
             (dict(tile_size=64.0), TypeError, "tile_size: expected an integer >= 1, got 64.0"),
             (dict(stages=0), ValueError, "stages: expected an integer >= 2, got 0"),
             (dict(stages=7), ValueError, r"stages: expected an integer in \[2, 6\], got 7"),
             (dict(stages=True), TypeError, "stages: expected an integer >= 2, got True"),
             (dict(page_size=0, paged=True), ValueError, "page_size: expected an integer >= 1, got 0"),
             (dict(page_size=7.5, paged=True), TypeError, "page_size: expected an integer >= 1, got 7.5"),
             (dict(features=1 << 20), ValueError, "features: expected a sum of FEATURES bits"),
             (dict(features=-1), ValueError, "features: expected an integer >= 0, got -1"),
             (dict(features="sinks"), TypeError, "features: expected an integer >= 0, got 'sinks'"),
             (dict(features=48), ValueError, r"features: one fp8 format .*got both bits in 48")]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            K.make_spec(**{**good, **change})
    assert K.make_spec(**{**good, "head_dim": np.int64(128), "stages": np.int32(3)}).stages == 3

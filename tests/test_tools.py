"""The SASS reading of tools/sass_loop.py on a made-up listing (CI has no
ptxas or cuobjdump; the tool itself runs where they are)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import sass_loop  # noqa: E402

LISTING = [
    (0x00, "MOV R1, c[0x0][0x28]"),
    (0x10, "IMAD R2, R3, R4, RZ"),           # outer loop head
    (0x20, "LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64], !P1"),
    (0x30, "LDGDEPBAR"),
    (0x40, "HMMA.16816.F32 R8, R10, R12, R8"),  # inner loop head
    (0x50, "@!P0 IMAD.WIDE.U32 R6, R7, UR4, R6"),
    (0x60, "HMMA.16816.F32 R8, R10, R14, R8"),
    (0x70, "@P2 BRA 0x40"),                  # inner loop: 2 HMMA, 4 instructions
    (0x80, "IADD3 R2, R2, 0x1, RZ"),
    (0x90, "@P3 BRA 0x10"),                  # outer loop: the same 2 HMMA, longer
    (0xa0, "EXIT"),
]


def test_tile_loop_is_the_shortest_loop_with_the_most_hmma():
    h, body = sass_loop._tile_loop(LISTING)
    assert h == 2
    assert [a for a, _ in body] == [0x40, 0x50, 0x60, 0x70]


def test_opcodes_drop_predicates_and_modifiers():
    assert sass_loop._opcode("@!P0 IMAD.WIDE.U32 R6, R7, UR4, R6") == "IMAD"
    assert sass_loop._opcode("@UP1 BRA 0x40") == "BRA"
    assert sass_loop._opcode("LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64], !P1") == "LDGSTS"


def test_no_loop_without_hmma():
    assert sass_loop._tile_loop([(0x0, "IADD3 R1, R1, 0x1, RZ"), (0x10, "@P0 BRA 0x0")]) is None


def test_spec_sweep_draws_its_shapes_as_asked():
    """tools/spec_sweep.py's two shape sources (the sweep itself needs a GPU):
    many-unit dense shapes in the lengths asked, and family shapes filtered by
    head_dim, layout, size and batch, the same for the same seed."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import spec_sweep

    dense = spec_sweep.draw(12, 7, 132, (64,), (2000, 10000))
    assert len(dense) == 12
    for c in dense:
        assert c.layout == "dense" and c.head_dim == 64 and 2000 <= c.max_len <= 10001
        assert c.kv_bytes() <= 400e6 + 1 and len(set(c.lens)) == 1
    fam = spec_sweep.family_shapes(10, 3, [64, 128], ["paged"], 60)
    assert len(fam) == 10 and fam == spec_sweep.family_shapes(10, 3, [64, 128], ["paged"], 60)
    for c in fam:
        assert c.layout == "paged" and c.head_dim in (64, 128) and c.kv_bytes() <= 60e6
        assert c.name.startswith("s") and "_f" in c.name  # the family seed it came from, then its name there
    assert len({c.name for c in fam}) == len(fam)
    one = spec_sweep.family_shapes(6, 3, [64, 128, 256], ["ragged", "paged"], 0, max_batch=1)
    assert len(one) == 6 and all(c.batch == 1 and c.layout in ("ragged", "paged") for c in one)
    mid = spec_sweep.family_shapes(6, 3, [64, 128, 256], ["ragged", "paged"], 0, max_units=44, min_units=17)
    assert len(mid) == 6 and all(17 <= c.batch * c.heads_kv <= 44 for c in mid)
    import pytest

    with pytest.raises(ValueError, match=r"layouts: expected some of .*got \['page'\]"):
        spec_sweep.family_shapes(3, 3, [64], ["page"], 0)

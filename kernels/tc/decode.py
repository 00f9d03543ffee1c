"""The register decode of the ``tc`` layout: a 16-entry table looked up by byte permutes (``prmt``), no memory.

:func:`decode_asm` returns the PTX body of one ``tl.inline_asm_elementwise(asm, "=r,=r,r,r", [codes], dtype,
is_pure=True, pack=4)`` over the int16 code words of the layout (``layout.py``). Triton hands it a thread's four
words at positions ``(r, k), (r, k+1), (r+8, k), (r+8, k+1)`` of the tensor-core operand as two registers
(``$2`` = the first pair, ``$3`` = the second) and takes back those four positions' values of quarter ``q`` of the
K tile (``$0``, ``$1``: two packed 16-bit pairs). The layout stores quarter ``q``'s four codes as the four nibbles
of word ``q`` of the group, so each quarter's decode reads one aligned 16-bit field and nothing is shuffled:

* ``w`` = the field (``$2``/``$3``, shifted down 16 bits for odd ``q``: a ``mul.hi`` by 2^16, on the FMA pipe);
* ``idx = w & 0x7777``: the low three bits of each code pick a byte of a word pair;
* ``m = prmt(w, w * 16, 0x9D8C)``: a byte of 0xFF where the code's top bit is set (``prmt``'s sign-replicate mode
  on the bytes whose sign bit is that top bit);
* four ``prmt`` look up the low and high bytes of entries 0-7 and 8-15, two ``lop3`` pick by ``m``, two ``prmt``
  interleave them into 16-bit values.

That is 10 integer-pipe instructions per four weights (2.5 per weight), with the table baked in as immediates
(the low bytes of the 16 entries in four words ``L0..L3``, the high bytes in ``H0..H3``), so the op has a single
operand and Triton keeps its result in registers as the left operand of the tensor-core product (a pure unary
inline asm is hoisted into the dot-operand layout: Triton's ``isPureUnaryInlineAsm``). The same sequence serves
fp16 and bf16 activations: only the table's bit patterns differ. Verified bit-exact against the table on the CPU by
an emulation of these instructions (``tests/kernels/test_tc.py``).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["table_bits", "decode_asm", "QUARTERS"]

QUARTERS = 4  # 64-column quarters of a 256-column K tile; code word q of a group holds quarter q


def table_bits(table: tuple[float, ...], dtype: torch.dtype) -> list[int]:
    """The 16 entries' 16-bit patterns in ``dtype`` (float16 or bfloat16), rounded to nearest even as torch does.

    Raises:
        ValueError: if ``dtype`` is not float16 or bfloat16, or the table does not hold 16 values.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the register decode makes float16 or bfloat16 operands, got {dtype}")
    if len(table) != 16:
        raise ValueError(f"table must hold 16 values, got {len(table)}")
    t = torch.tensor([float(v) for v in table], dtype=torch.float32)  # the layer's fp32 values, then torch's rounding
    return [int(v) & 0xFFFF for v in t.to(dtype).view(torch.int16).tolist()]


@functools.lru_cache(maxsize=4096)
def decode_asm(table: tuple[float, ...], dtype: torch.dtype, quarter: int) -> str:
    """PTX of the decode of quarter ``quarter`` (0-3): the four nibbles of 16-bit field ``quarter`` of ``$2:$3``
    into four 16-bit values of ``table`` in ``dtype`` (``$0``: values 0 and 1, ``$1``: values 2 and 3).

    Raises:
        ValueError: if ``quarter`` is not 0-3 (and see :func:`table_bits`).
    """
    if quarter not in range(QUARTERS):
        raise ValueError(f"quarter must be 0, 1, 2 or 3, got {quarter!r}")
    t = table_bits(tuple(table), dtype)
    lo = [sum((t[4 * r + i] & 0xFF) << (8 * i) for i in range(4)) for r in range(4)]
    hi = [sum((t[4 * r + i] >> 8) << (8 * i) for i in range(4)) for r in range(4)]
    src = "$2" if quarter < 2 else "$3"
    field = f"mov.b32 w, {src};" if quarter % 2 == 0 else f"mul.hi.u32 w, {src}, 65536;"
    return f"""{{
 .reg .b32 w, w4, m, idx, la, lb, ha, hb, lo, hi;
 {field}
 and.b32 idx, w, 0x7777;
 mul.lo.u32 w4, w, 16;
 prmt.b32 m, w, w4, 0x9D8C;
 prmt.b32 la, {lo[0]}, {lo[1]}, idx;
 prmt.b32 lb, {lo[2]}, {lo[3]}, idx;
 prmt.b32 ha, {hi[0]}, {hi[1]}, idx;
 prmt.b32 hb, {hi[2]}, {hi[3]}, idx;
 lop3.b32 lo, la, lb, m, 0xD8;
 lop3.b32 hi, ha, hb, m, 0xD8;
 prmt.b32 $0, lo, hi, 0x5140;
 prmt.b32 $1, lo, hi, 0x7362;
}}"""

"""The register decode of the ``tc`` layout: a 16-entry table looked up by byte permutes (``prmt``), no memory.

:func:`decode_asm` returns the PTX body of one ``tl.inline_asm_elementwise(asm, "=r,=r,r", [codes], dtype,
is_pure=True, pack=4)``: four code bytes in, the four values of their low (or high) nibbles out as two packed
16-bit pairs. The table is baked in as immediates (the low bytes of the 16 entries in four words ``L0..L3``, the
high bytes in ``H0..H3``), so the op has a single operand and Triton can keep its result in registers as the left
operand of the tensor-core product (a pure unary inline asm is hoisted into the dot-operand layout; Triton's
``isPureUnaryInlineAsm``). Per four codes: two instructions compact the nibbles into one 16-bit half
(``idx``: the low three bits of each code pick a byte of a word pair, the top bit picks the pair), six ``prmt``
look the low and high bytes up, two interleave them: about 4 integer instructions per weight.

The same sequence serves fp16 and bf16 activations: only the table's bit patterns differ. Verified bit-exact
against the table on the CPU by an emulation of these instructions (``tests/kernels/test_tc.py``).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["table_bits", "decode_asm"]


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
def decode_asm(table: tuple[float, ...], dtype: torch.dtype, high: bool) -> str:
    """PTX of the decode of the low (``high=False``) or high nibbles of four packed code bytes (``$2``) into four
    16-bit values of ``table`` in ``dtype`` (``$0``: values 0 and 1, ``$1``: values 2 and 3)."""
    t = table_bits(tuple(table), dtype)
    lo = [sum((t[4 * r + i] & 0xFF) << (8 * i) for i in range(4)) for r in range(4)]
    hi = [sum((t[4 * r + i] >> 8) << (8 * i) for i in range(4)) for r in range(4)]
    first = "shr.b32 q, $2, 4;\n and.b32 t, q, 0x0F0F0F0F;" if high else "and.b32 t, $2, 0x0F0F0F0F;"
    return f"""{{
 .reg .b32 q, t, u, s, idx, sg, sel, la, lb, ha, hb, lo, hi, z, L0, L1, L2, L3, H0, H1, H2, H3;
 mov.b32 L0, {lo[0]}; mov.b32 L1, {lo[1]}; mov.b32 L2, {lo[2]}; mov.b32 L3, {lo[3]};
 mov.b32 H0, {hi[0]}; mov.b32 H1, {hi[1]}; mov.b32 H2, {hi[2]}; mov.b32 H3, {hi[3]};
 mov.b32 z, 0;
 {first}
 shr.b32 u, t, 4;
 or.b32 u, t, u;
 prmt.b32 s, u, z, 0x0020;
 and.b32 idx, s, 0x7777;
 shr.b32 sg, s, 1;
 and.b32 sg, sg, 0x4444;
 or.b32 sel, sg, 0x3210;
 prmt.b32 la, L0, L1, idx;
 prmt.b32 lb, L2, L3, idx;
 prmt.b32 lo, la, lb, sel;
 prmt.b32 ha, H0, H1, idx;
 prmt.b32 hb, H2, H3, idx;
 prmt.b32 hi, ha, hb, sel;
 prmt.b32 $0, lo, hi, 0x5140;
 prmt.b32 $1, lo, hi, 0x7362;
}}"""

"""A tiny emulator of the PTX subset the ``tc`` register decode uses (``mov``, ``and``, ``or``, ``xor``, ``shr``,
``prmt``, ``lop3`` on ``.b32``; ``mul.lo``/``mul.hi`` on ``.u32``), so CPU CI checks the decode bit for bit (the
Triton interpreter cannot run inline asm)."""

from __future__ import annotations

import re

M32 = 0xFFFFFFFF


def prmt(a: int, b: int, sel: int) -> int:
    """``prmt.b32 d, a, b, sel`` (default mode): byte i of d = byte (sel nibble i & 7) of {b:a}; nibble bit 3
    replicates that byte's sign bit."""
    pool = (a & M32) | ((b & M32) << 32)
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (pool >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """``lop3.b32 d, a, b, c, lut``: bit i of d = bit (a_i * 4 + b_i * 2 + c_i) of ``lut`` (``lut`` is the function
    applied to a = 0xF0, b = 0xCC, c = 0xAA)."""
    out = 0
    for i in range(32):
        k = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        out |= ((lut >> k) & 1) << i
    return out


def run(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Execute ``asm`` (the body between braces) with ``$n`` operands in ``inputs``; returns every register."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0) & M32

    for stmt in re.split(r";\s*", asm.replace("{", "").replace("}", "")):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "or.b32":
            regs[args[0]] = val(args[1]) | val(args[2])
        elif op == "xor.b32":
            regs[args[0]] = val(args[1]) ^ val(args[2])
        elif op == "mul.lo.u32":
            regs[args[0]] = (val(args[1]) * val(args[2])) & M32
        elif op == "mul.hi.u32":
            regs[args[0]] = ((val(args[1]) * val(args[2])) >> 32) & M32
        elif op == "lop3.b32":
            regs[args[0]] = lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif op == "shr.b32":
            regs[args[0]] = (val(args[1]) & M32) >> val(args[2])
        elif op == "prmt.b32":
            regs[args[0]] = prmt(val(args[1]), val(args[2]), val(args[3]))
        else:
            raise ValueError(f"unsupported instruction {op!r}")
    return regs

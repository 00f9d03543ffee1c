"""The ``tc`` kernel's instruction mix on Hopper, without a GPU: compile it ahead of time for sm_90a with the Triton
that is installed (the device machine runs 3.6.0: put ``pip install --target DIR triton==3.6.0`` first on
``PYTHONPATH`` to match it), assemble the PTX with Triton's own ``ptxas``, disassemble with its ``nvdisasm`` and count
the SASS instructions of the main loop (the longest backward branch) per decoded weight.

On 2026-12-08 this reproduced the H100's compile of the same configuration (885 vs 874 loop instructions, the same
mix), so decode variants can be compared here before they cost device time. The arguments get the divisibility the
launcher's tensors have (16), as Triton's JIT specialises them.

    PYTHONPATH=/tmp/t36 python -m bench.kernels.tc_sass --block-n 128 --block-b 16 --warps 4 --stages 4
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch

#: opcodes that issue to Hopper's integer (ALU) pipe, the decode's bottleneck (IMAD runs on the FMA pipe)
INT_PIPE = ("PRMT", "LOP3", "SHF", "LEA", "IADD3", "SEL", "ISETP", "PLOP3", "BMSK", "FLO", "POPC")


def compile_ptx(block_n: int, block_b: int, warps: int, stages: int, dtype: str = "fp16") -> str:
    """PTX of ``tc_matmul_kernel`` (register decode) for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget

    from dc_lightning.kernels.tc.decode import decode_asm
    from dc_lightning.kernels.tc.jit import tc_matmul_kernel

    table = tuple(float(v) for v in torch.linspace(-0.1, 0.1, 15)) + (0.0,)
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    sig = {"x_ptr": f"*{dtype}", "codes_ptr": "*i16", "codebook_ptr": "*fp32", "bias_ptr": "*fp32",
           "y_ptr": f"*{dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "B": "i32", "N": "i32", "K": "i32",
           "n_rows": "i32", "k_tiles": "i32", "tiles_per_split": "i32", "n_split": "i32"}  # fmt: skip
    consts = {"BLOCK_N": block_n, "BLOCK_B": block_b, "DECODE": 0,
              **{f"ASM{q}": decode_asm(table, tdt, q) for q in range(4)}, "HAS_BIAS": False, "RELU": False,
              "EVEN_N": True, "EVEN_K": True}  # fmt: skip
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    aligned = ("x_ptr", "codes_ptr", "codebook_ptr", "bias_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "K", "n_rows")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=tc_matmul_kernel, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return kernel.asm["ptx"]


def loop_mix(ptx: str) -> collections.Counter:
    """SASS opcode counts of the longest loop of ``ptx`` assembled for sm_90a."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", str(src), "-o", str(cubin)], check=True)
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout.splitlines()  # fmt: skip
    best = None
    for i, line in enumerate(sass):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        j = next((k for k, s in enumerate(sass) if s.startswith(m.group(1) + ":")), None)
        if j is not None and j < i and (best is None or i - j > best[1] - best[0]):
            best = (j, i)
    if best is None:
        raise RuntimeError("no loop found in the SASS")
    mix = collections.Counter()
    for line in sass[best[0] : best[1] + 1]:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            mix[m.group(2)] += 1
    return mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--block-b", type=int, default=16)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    a = ap.parse_args()
    import triton

    mix = loop_mix(compile_ptx(a.block_n, a.block_b, a.warps, a.stages, a.dtype))
    weights = a.block_n * 256 / (32 * a.warps)  # decoded weights per thread per loop iteration (one 256-column tile)
    total = sum(mix.values())
    print(f"triton {triton.__version__}, block_n={a.block_n} block_b={a.block_b} warps={a.warps} stages={a.stages}")
    print(f"loop: {total} instructions, {weights:.0f} weights per thread -> {total / weights:.2f} per weight")
    alu = sum(n for op, n in mix.items() if op in INT_PIPE)
    print(f"integer pipe ({', '.join(INT_PIPE)}): {alu / weights:.2f} per weight")
    for op, n in mix.most_common(14):
        print(f"  {op:10s} {n:5d}  {n / weights:5.2f} per weight")


if __name__ == "__main__":
    main()

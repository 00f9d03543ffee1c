"""What Triton makes of the ``tc`` kernel (issue 23's P0 question, on the production kernel): compile it for the
VGG-6 shape (4096 x 25088, fp16, batch 16 and 64) with each row tile, and report from the TTGIR/PTX whether the
decoded weights reach the tensor cores from registers (a ``warp_group_dot`` whose A operand is a
``#ttg.dot_op`` register tensor, no ``local_alloc`` of the decoded tile), the ``prmt`` count per weight, the
``wgmma`` count, registers and spills. Writes ``tc_ir.json`` and the TTGIR/PTX of each variant under ``$OUT/tc_ir``.

    python -m bench.gpu.tc_ir            # CUDA only
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from bench.harness.report import env_info
from dc_lightning.kernels.tc import op as T
from dc_lightning.kernels.tc.jit import tc_matmul_kernel
from dc_lightning.kernels.tc.layout import pack_tc


def summary(k) -> dict:
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    dots = [ln.strip() for ln in ttgir.splitlines() if "warp_group_dot " in ln or " tt.dot " in ln]
    return {
        "dot_lines": [d[:300] for d in dots[:4]],
        "warp_group_dot": len(re.findall(r"warp_group_dot ", ttgir)),
        "A_in_registers": any(re.search(r"warp_group_dot %\S+, %\S+.*: tensor<\d+x\d+x(f16|bf16), #ttg\.dot_op", d)
                              for d in dots),  # fmt: skip
        "local_alloc": ttgir.count("local_alloc"),
        "async_copy": ttgir.count("async_copy_global_to_local"),
        "prmt": ptx.count("prmt.b32"),
        "wgmma_ptx": ptx.count("wgmma.mma_async"),
        "mma_sync_ptx": ptx.count("mma.sync"),
        "regs": getattr(k, "n_regs", None),
        "spills": getattr(k, "n_spills", None),
    }


def main() -> None:
    out = Path(os.environ.get("OUT", "bench/out")) / "tc_ir"
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = 4096, 25088
    rows, cols = (torch.rand(n, k, generator=g, device="cuda") < 0.04).nonzero(as_tuple=True)
    codes = torch.randint(0, 15, (rows.numel(),), generator=g, device="cuda")
    p = pack_tc(n, k, rows, cols, codes, torch.randn(15, generator=g, device="cuda") * 0.05)
    res = {"env": env_info("cuda"), "variants": {}}
    for batch in (16, 64):
        x = torch.randn(batch, k, device="cuda").half()
        for bn, nw in ((64, 4), (128, 4), (128, 8)):
            cfg = {"block_n": bn, "num_warps": nw, "decode": 0}
            y = torch.empty(batch, n, device="cuda", dtype=torch.float16)
            grid, args, meta, _ = T.launch_plan(x, p, y, None, False, cfg)
            name = f"B{batch}_bn{bn}_w{nw}"
            try:
                kern = tc_matmul_kernel[grid](*args, DECODE=0, **meta)
                torch.cuda.synchronize()
                res["variants"][name] = summary(kern)
                (out / f"{name}.ttgir").write_text(kern.asm["ttgir"])
                (out / f"{name}.ptx").write_text(kern.asm["ptx"])
            except Exception as err:  # noqa: BLE001 - recorded
                res["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            print(name, json.dumps(res["variants"][name]), flush=True)
    (out / "tc_ir.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Helpers shared by the kernel test files (tests/kernels is on sys.path: pytest's rootdir-less import mode puts
it there, and a test file run as the interpreter child process has it as its script folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def reference(case: dict, rows, cols, codes, codebook, x, bias) -> torch.Tensor:
    """float64 ``act(x @ W.T + bias)`` of a case's random layer."""
    w = torch.zeros(case["n"], case["k"], dtype=torch.float64)
    w[rows, cols] = codebook.double()[codes]
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return torch.relu(y) if case.get("relu") else y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``y`` against the float64 ``ref`` (inf for non-finite output)."""
    if not torch.isfinite(y).all():
        return float("inf")
    diff = (y.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def run_interpreter_child(script: Path, out: Path) -> dict:
    """Run ``script OUT`` with ``TRITON_INTERPRET=1`` in a child process and return the JSON it wrote.

    Triton's interpreter has to be set before triton is first imported, and another test file may already have
    imported triton in the pytest process, hence the child.
    """
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())

"""The fused codebook step (``dc_lightning.kernels.codebook.step``, ``quantization.CodebookStep``) vs float64.

The Triton cases run under ``TRITON_INTERPRET=1`` in ONE child process (this file executed as a script; the variable
must be set before triton is first imported) that writes its measurements to JSON; the tests below assert on them.
Oracle: ``quantization.codebook_grad`` (float64 prefix sums) and ``decode_weight``. The fused sum is float64 in a
different (fixed) order, so it may differ from the oracle by float64 rounding before the cast to float32: the
tolerance is 1e-6 of the sum of |gradient| of the cluster's members (and most entries are bitwise equal).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
# triton is a hard dependency on Linux (pyproject.toml): there a missing triton fails these tests, not skips them
HAS_TRITON = sys.platform == "linux" or importlib.util.find_spec("triton") is not None

# layers of a case: (shape, bits, density (None = no mask, 0.0 = all pruned), weight dtype)
CASES = [
    {"id": "odd_sizes_1to8_bits", "layers": [((7, 13), b, 0.6, "float32") for b in range(1, 9)], "chunk": 8},
    {"id": "all_pruned_and_unmasked", "layers": [((5, 3), 3, 0.0, "float32"), ((1,), 1, None, "float32"),
                                                 ((33, 3, 3), 8, None, "float32")], "chunk": 4},  # fmt: skip
    {"id": "big_clusters_many_chunks", "layers": [((300, 7), 2, 0.9, "float32"), ((257,), 5, 0.5, "float32")],
     "chunk": 16},  # fmt: skip
    {"id": "bf16_weights", "layers": [((9, 11), 4, 0.5, "bfloat16"), ((65,), 8, None, "bfloat16")], "chunk": 8},
    {"id": "default_chunking", "layers": [((129, 40), 5, 0.3, "float32"), ((3, 2, 3, 3), 8, 0.7, "float32")]},
]


class Layer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def make_layers(case: dict, seed: int = 0) -> list[Layer]:
    """Quantized layers with random codes that leave the upper half of every codebook empty."""
    from dc_lightning.quantization.codebooks import attach_codebook

    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, bits, density, dtype in case["layers"]:
        k = 2**bits
        layer = Layer(torch.zeros(shape, dtype=getattr(torch, dtype)))
        if density is not None:
            layer.register_buffer("weight_mask", torch.rand(shape, generator=g) < density)
        codes = torch.randint(0, max(1, k // 2), shape, generator=g)
        attach_codebook(layer, torch.randn(k, generator=g).sort().values, codes)
        out.append(layer)
    return out


def grad_error(got: torch.Tensor, ref: torch.Tensor, grad: torch.Tensor, layer: Layer) -> tuple[float, bool]:
    """max |got - ref| / (1e-30 + Σ|g| of the cluster's members), and whether got == ref bitwise."""
    from dc_lightning.buffers import get_codebook
    from dc_lightning.quantization.codebooks import codebook_grad

    _, assign = get_codebook(layer)
    mask = getattr(layer, "weight_mask", None)
    scale = codebook_grad(grad.abs(), assign, mask, ref.numel()).double()
    err = ((got.double() - ref.double()).abs() / (scale + 1e-30)).max().item()
    return err, bool(torch.equal(got, ref))


def _run_interpreter_cases(out_path: str) -> None:
    """Child-process entry point: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dc_lightning.buffers import get_codebook
    from dc_lightning.kernels.codebook import step as K
    from dc_lightning.quantization.codebooks import codebook_grad, decode_weight
    from dc_lightning.quantization.step import CodebookStep

    results: dict = {}
    for case in CASES:
        layers = make_layers(case)
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(m.weight.shape, generator=g).to(m.weight.dtype) for m in layers]
        refs = [codebook_grad(gr, *get_codebook(m)[1:], getattr(m, "weight_mask", None), get_codebook(m)[0].numel())
                for gr, m in zip(grads, layers, strict=True)]  # fmt: skip
        res: dict = {"errors": [], "bitwise": [], "rewrite_equal": [], "zeros_positive": []}
        # kernel level, with the case's (small) chunk so that clusters span several chunks
        plan = K.build_plan(
            [m.weight.data for m in layers],
            [get_codebook(m)[1] for m in layers],
            [getattr(m, "weight_mask", None) for m in layers],
            [get_codebook(m)[0].numel() for m in layers],
            chunk=case.get("chunk", K.CHUNK),
            block=min(4, case.get("chunk", K.BLOCK)) if "chunk" in case else K.BLOCK,
            rewrite_block=16 if "chunk" in case else K.REWRITE_BLOCK,
        )
        flat = K.codebook_grads_triton(plan, grads)
        res["deterministic"] = bool(torch.equal(flat, K.codebook_grads_triton(plan, grads)))
        for i, (m, gr, ref) in enumerate(zip(layers, grads, refs, strict=True)):
            err, same = grad_error(flat[plan.cb_offsets[i] : plan.cb_offsets[i + 1]], ref, gr, m)
            res["errors"].append(err)
            res["bitwise"].append(same)
        K.rewrite_triton(plan, [get_codebook(m)[0] for m in layers])
        for m in layers:
            res["rewrite_equal"].append(bool(torch.equal(m.weight.detach(), decode_weight(m))))
            mask = getattr(m, "weight_mask", None)
            zeros = m.weight.detach()[~mask] if mask is not None else m.weight.new_zeros(0)
            res["zeros_positive"].append(bool((zeros == 0).all() and not torch.signbit(zeros).any()))
        # module level: CodebookStep picks Triton under the interpreter and matches its reference backend
        step = CodebookStep(layers)
        got, finite = step.codebook_grads(grads)
        ref_step = CodebookStep(layers, backend="reference")
        want, _ = ref_step.codebook_grads(grads)
        res["step_backend"] = step.backend
        res["step_finite"] = bool(finite)
        res["step_errors"] = [grad_error(a, b, gr, m)[0] for a, b, gr, m in zip(got, want, grads, layers, strict=True)]
        for m in layers:  # move the codebooks, rewrite through the step, compare with decode_weight
            get_codebook(m)[0].add_(0.25)
        step.rewrite()
        res["step_rewrite_equal"] = [bool(torch.equal(m.weight.detach(), decode_weight(m))) for m in layers]
        last = layers[-1]
        member = 0 if getattr(last, "weight_mask", None) is None else int(last.weight_mask.reshape(-1).nonzero()[0])
        grads[-1].view(-1)[member] = float("nan")
        res["nan_flagged"] = not bool(step.codebook_grads(grads)[1])
        results[case["id"]] = res
    results["_callback"] = _callback_run()
    Path(out_path).write_text(json.dumps(results))


def _callback_run() -> dict:
    """A tiny fit with TrainedQuantization through the Triton step, and the same fit through the reference."""
    import lightning.pytorch as pl

    sys.path.insert(0, str(HERE.parents[1]))
    from callbacks.test_trained_quantization import Check, Module, prune_by_hand
    from nets import cpu_trainer, toy_loader

    from dc_lightning.callbacks.trained_quantization import TrainedQuantization
    from dc_lightning.kernels.codebook import step as K

    def fit() -> tuple[dict, list[str], int]:
        pl.seed_everything(0)
        module = Module("sgd")
        prune_by_hand(module)
        q = TrainedQuantization(bits=3, start_epoch=1, verbose=False)
        check = Check(q)
        cpu_trainer(3, [q, check]).fit(module, toy_loader())
        return module.state_dict(), [s.backend for _, s in q._steps.values()], check.steps

    fused, backends, steps = fit()
    usable = K.triton_usable
    K.triton_usable = lambda device: False  # the same fit through the reference backend
    try:
        ref, ref_backends, _ = fit()
    finally:
        K.triton_usable = usable
    diff = max((fused[k].double() - ref[k].double()).abs().max().item() for k in fused if fused[k].is_floating_point())
    return {"backends": backends, "ref_backends": ref_backends, "checked_steps": steps, "max_abs_diff": diff}


@pytest.fixture(scope="module")
def interp() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"codebook_step_interp_{os.getpid()}.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())
    out.unlink()
    return data


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fused_grads_match_float64_reference(case: dict, interp: dict) -> None:
    res = interp[case["id"]]
    assert max(res["errors"]) <= 1e-6, res["errors"]
    assert max(res["step_errors"]) <= 1e-6, res["step_errors"]
    assert res["deterministic"]
    assert sum(res["bitwise"]) >= len(res["bitwise"]) - 1  # float64 sums: ties at float32's last bit are rare
    assert res["step_backend"] == "triton" and res["step_finite"] and res["nan_flagged"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fused_rewrite_is_decode_weight_bitwise(case: dict, interp: dict) -> None:
    res = interp[case["id"]]
    assert all(res["rewrite_equal"]) and all(res["step_rewrite_equal"])
    assert all(res["zeros_positive"])


def test_callback_through_triton_matches_reference_backend(interp: dict) -> None:
    res = interp["_callback"]
    assert res["backends"] == ["triton"] and res["ref_backends"] == ["reference"]
    assert res["checked_steps"] == 8  # Check asserted weights == decode_weight after each fine-tuning step
    assert res["max_abs_diff"] <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# In-process: plan validation, the reference path, staleness, the sync-free skip of a non-finite step
# ---------------------------------------------------------------------------------------------------------------


def test_reference_backend_equals_per_layer_functions() -> None:
    from dc_lightning.buffers import get_codebook
    from dc_lightning.kernels.codebook import step as K
    from dc_lightning.quantization.codebooks import codebook_grad, decode_weight
    from dc_lightning.quantization.step import CodebookStep

    layers = make_layers(CASES[0], seed=3)
    grads = [torch.randn(m.weight.shape) for m in layers]
    step = CodebookStep(layers)
    assert step.backend == ("triton" if K.triton_usable(torch.device("cpu")) else "reference")
    step = CodebookStep(layers, backend="reference")
    got, finite = step.codebook_grads(grads[:3] + [None] + grads[4:])
    assert got[3] is None and bool(finite)
    for i in (0, 5, 7):
        m = layers[i]
        want = codebook_grad(grads[i], get_codebook(m)[1], m.weight_mask, get_codebook(m)[0].numel())
        assert torch.equal(got[i], want)
    step.rewrite()
    assert all(torch.equal(m.weight.detach(), decode_weight(m)) for m in layers)


def test_auto_falls_back_to_reference_when_a_kernel_fails_first(caplog) -> None:
    from dc_lightning.quantization.step import CodebookStep

    layers = make_layers(CASES[1], seed=0)
    grads = [torch.randn(m.weight.shape) for m in layers]
    want, _ = CodebookStep(layers, backend="reference").codebook_grads(grads)

    def broken(*args):
        raise RuntimeError("no kernel for this GPU")

    step = CodebookStep(layers, backend="reference")
    step.backend, step._requested, step._grads_triton = "triton", "auto", broken  # as if auto had picked Triton
    got, finite = step.codebook_grads(grads)
    assert step.backend == "reference" and "Triton grads kernel failed" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)) and bool(finite)
    step.backend, step._requested = "triton", "triton"  # asked for explicitly: the error propagates
    with pytest.raises(RuntimeError, match="no kernel"):
        step.codebook_grads(grads)


def test_stale_after_mask_or_codes_change() -> None:
    from dc_lightning.quantization.step import CodebookStep

    layers = make_layers(CASES[1], seed=0)
    step = CodebookStep(layers, backend="reference")
    assert not step.stale()
    layers[0].weight_mask[0, 0] = False  # a pruning round tightens the mask in place
    assert step.stale()
    step = CodebookStep(layers, backend="reference")
    layers[2].weight_assign.zero_()
    assert step.stale()


def test_bad_arguments_name_the_problem() -> None:
    from dc_lightning.kernels.codebook import step as K
    from dc_lightning.quantization.step import CodebookStep

    with pytest.raises(ValueError, match="backend must be one of"):
        CodebookStep(make_layers(CASES[1]), backend="cuda")
    with pytest.raises(ValueError, match="layer 0 .* has no weight_codebook"):
        CodebookStep([Layer(torch.zeros(3))])
    w = torch.zeros(4, 5)
    a = torch.zeros(4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="layer 0: assign must be"):
        K.build_plan([w], [a.long()], [None], [4])
    with pytest.raises(ValueError, match="layer 0: mask must be"):
        K.build_plan([w], [a], [torch.ones(4, 5)], [4])
    with pytest.raises(ValueError, match="layer 1: weight on"):
        K.build_plan([w, w.double()], [a, a], [None, None], [4, 4])
    with pytest.raises(ValueError, match="k must be an int in 1..256"):
        K.build_plan([w], [a], [None], [512])
    with pytest.raises(ValueError, match="chunk a multiple"):
        K.build_plan([w], [a], [None], [4], chunk=100, block=64)
    if not K.triton_usable(torch.device("cpu")):
        plan = K.build_plan([w], [a], [None], [4])
        with pytest.raises(RuntimeError, match="need Triton and CUDA"):
            K.codebook_grads_triton(plan, [w])


def _codebook_opt(momentum: float, warm: bool, nan: bool) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """Two codebooks in an SGD of two groups, optionally after one step, with finite or NaN gradients set."""
    cbs = [torch.linspace(-1, 1, 4), torch.linspace(0, 2, 8)]
    opt = torch.optim.SGD([{"params": [cbs[0]], "lr": 0.1}, {"params": [cbs[1]], "lr": 0.2}], momentum=momentum)
    if warm:
        for c in cbs:
            c.grad = torch.ones_like(c)
        opt.step()  # momentum buffers exist from here on
    for c in cbs:
        c.grad = torch.full_like(c, float("nan") if nan else 0.5)
    return opt, cbs


def _state(opt: torch.optim.Optimizer, cbs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [c.clone() for c in cbs] + [v.clone() for c in cbs for v in opt.state.get(c, {}).values()]


@pytest.mark.parametrize("momentum,warm", [(0.9, True), (0.9, False), (0.0, True)])
@pytest.mark.parametrize("nan", [False, True])
def test_device_side_skip_restores_codebooks_and_state(momentum: float, warm: bool, nan: bool) -> None:
    """The sync-free path (what CUDA runs): step, then undo on the device when the flag says non-finite; a step
    that would create optimizer state reads the flag on the host and drops that state."""
    from dc_lightning.callbacks.trained_quantization import TrainedQuantization

    q = TrainedQuantization(verbose=False)
    opt, cbs = _codebook_opt(momentum, warm, nan)
    before = _state(opt, cbs)
    if nan:  # warned when the flag is read: at once (state created) or when skipped_steps is read
        with pytest.warns(UserWarning, match="codebook step"):
            q._step_unless_nonfinite(opt, torch.tensor(False), sync=False)
            assert q.skipped_steps == 1
    else:
        q._step_unless_nonfinite(opt, torch.tensor(True), sync=False)
        assert q.skipped_steps == 0
    ref_opt, ref_cbs = _codebook_opt(momentum, warm, nan)
    if not nan:
        ref_opt.step()
    after, want = _state(opt, cbs), _state(ref_opt, ref_cbs)
    assert len(after) == len(want) and all(torch.equal(a, w) for a, w in zip(after, want, strict=True))
    if nan:
        assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    else:
        assert not torch.equal(after[0], before[0])


if __name__ == "__main__":
    _run_interpreter_cases(sys.argv[1])

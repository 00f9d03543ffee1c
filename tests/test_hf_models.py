"""Hugging Face language models end to end (issue 22): tiny ``GPT2LMHeadModel`` (``Conv1D`` projections, ``lm_head``
tied to ``wte``) and ``LlamaForCausalLM`` trained a few CPU steps with the real callbacks, every weight matrix
compressed by default, saved, rebuilt from the file's builder record (``trusted=["transformers.*"]``), converted,
and run by ``model.generate()`` and ``dc-lightning generate``. transformers is an optional test extra (``.[dev]``)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _unshadow_kernels() -> None:
    """The repository's top-level ``kernels/`` folder (shipped as ``dc_lightning.kernels``) shadows the PyPI package
    ``kernels`` that transformers imports when it is installed, whenever the repository root is on ``sys.path``
    (``python -m pytest`` from the root): import the installed one first, with the root hidden."""
    if "kernels" in sys.modules or importlib.util.find_spec("kernels") is None:
        return
    origin = importlib.util.find_spec("kernels").origin or ""
    if not Path(origin).resolve().is_relative_to(ROOT):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


_unshadow_kernels()
pytest.importorskip("transformers")

import lightning.pytorch as pl  # noqa: E402
from lm_nets import tiny_gpt2, tiny_llama  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from dc_lightning import MagnitudePruning, TrainedQuantization, buffers, kinds  # noqa: E402
from dc_lightning.cli.generate import cli_generate  # noqa: E402
from dc_lightning.dcz import build_file, read_compressed  # noqa: E402
from dc_lightning.inference.conv1d import CompressedConv1D  # noqa: E402
from dc_lightning.inference.conversion import plan_conversion, to_compressed_inference  # noqa: E402
from dc_lightning.inference.linear import CompressedLinear  # noqa: E402
from dc_lightning.io import load_compressed, save_compressed  # noqa: E402
from dc_lightning.pruning.masks import prune_model  # noqa: E402
from dc_lightning.quantization.codebooks import quantize_model  # noqa: E402
from dc_lightning.report import compression_report  # noqa: E402
from dc_lightning.targets import select_targets  # noqa: E402

BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}
VOCAB, SEQ = 96, 16
PROMPT = [5, 6, 7]
TRUSTED = ["transformers.*"]
#: the callbacks' settings of this file and of the README's Hugging Face example: 30 % of every matrix kept (the
#: README's "*": 0.3), the paper's 5-bit codebooks for the fc family [DC §5] (TrainedQuantization's default)
DENSITY = 0.3


class CausalLM(pl.LightningModule):
    """The user's LightningModule around a Hugging Face causal LM (the loss is the model's own)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _counting() -> DataLoader:
    """Sequences counting up from a random start (tokens 3..95, so never Llama's bos/eos 1 and 2)."""
    g = torch.Generator().manual_seed(0)
    x = 3 + (torch.randint(0, VOCAB - 3, (128, 1), generator=g) + torch.arange(SEQ)) % (VOCAB - 3)
    return DataLoader(TensorDataset(x), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(BUILD))
def trained(request, tmp_path_factory):
    """``(name, model, path)``: the model trained 6 epochs (pruned at the start of epoch 2, clustered at the start of
    epoch 3, fine-tuned after) and saved with the default settings."""
    name = request.param
    model = BUILD[name](vocab=VOCAB).train()
    trainer = pl.Trainer(
        max_epochs=6, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[MagnitudePruning(densities=DENSITY, prune_epochs=[2], verbose=False),
                   TrainedQuantization(verbose=False, log_histograms=False)],
    )  # fmt: skip
    trainer.fit(CausalLM(model), _counting())
    path = tmp_path_factory.mktemp(name) / f"{name}.dcz"
    save_compressed(model.eval(), path)
    return name, model, path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _greedy(model: nn.Module) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    return out[0].tolist()


# ------------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name", sorted(BUILD))
def test_every_weight_matrix_is_a_target_by_default(name):
    """Every 2-D weight is a target (position embeddings included: an ``nn.Embedding`` like any other); the tied
    ``lm_head`` of GPT-2 is the same Parameter as ``wte``, so one target."""
    model = BUILD[name]()
    targets = select_targets(model)
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}  # named_parameters lists a tied one once
    assert {t.full_name for t in targets.values()} == matrices
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    if name == "gpt2":
        assert len(conv1d) == 8 and set(conv1d) < set(targets) and "transformer.wpe" in targets
        assert model.lm_head.weight is model.transformer.wte.weight and "lm_head" not in targets
        assert targets.tied == {"lm_head.weight": "transformer.wte"}
        kind = kinds.kind_of(model.transformer.h[0].attn.c_attn)
        assert kind.torch_type is Conv1D and kind.name == "Conv1D" and kind.family == "fc"
    else:
        assert not conv1d and "lm_head" in targets and not targets.tied


def test_a_pattern_that_matches_no_target_names_what_it_matches(caplog):
    model = tiny_gpt2()
    narrow = (nn.Linear, nn.Embedding)
    with caplog.at_level(logging.WARNING, logger="dc_lightning.targets"):
        with pytest.raises(ValueError, match=r"pattern '\*c_attn' matches no target layer") as err:
            prune_model(model, densities={"*c_attn": 0.3}, types=narrow)
    msg = str(err.value)
    assert "their type is not targeted: transformer.h.0.attn.c_attn (Conv1D), transformer.h.1.attn.c_attn (Conv1D)" \
        in msg and "pass types=(*DEFAULT_TARGET_TYPES, Conv1D)" in msg
    assert "8 weight matrices (83% of the weights in matrices) are of module types not targeted" in caplog.text
    assert "Conv1D (8)" in caplog.text
    with pytest.raises(ValueError, match=r"include pattern '\*mlp\*' matches no layer.*model.transformer.h.0.mlp.c_fc "
                                         r"\(Conv1D\), model.transformer.h.0.mlp.c_proj \(Conv1D\)"):
        MagnitudePruning(densities=0.3, include=["*mlp*"], types=narrow).setup(
            pl.Trainer(logger=False, max_epochs=1), CausalLM(model), "fit")
    # the tied lm_head is wte's weight: a pattern naming either selects the one target
    assert [r["layer"] for r in prune_model(model, densities={"lm_head": 0.3})] == ["transformer.wte"]
    pruned = prune_model(model, densities={"*c_attn": 0.3})
    assert [r["layer"] for r in pruned] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


# ---------------------------------------------------------------------------------------- file and reload


def test_the_callbacks_compress_every_matrix_and_the_file_reloads_bit_exact(trained):
    name, model, path = trained
    targets = select_targets(model)
    for t in targets.values():
        mask, (codebook, _) = buffers.get_mask(t.module, t.param), buffers.get_codebook(t.module, t.param)
        assert abs(float(mask.float().mean()) - DENSITY) < 0.01 and codebook.numel() == 32, t.name  # 5 bits
    assert set(read_compressed(path).layers) == set(targets)
    with pytest.raises(ValueError, match="nothing was imported"):
        load_compressed(path)
    loaded = load_compressed(path, trusted=TRUSTED)
    assert type(loaded) is type(model) and loaded.config.to_dict() == model.config.to_dict()
    want, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # buffers included
    record = read_compressed(path).builder
    cls = type(model)
    assert record == {"callable": f"{cls.__module__}:{cls.__qualname__}",
                      "config": json.loads(json.dumps(model.config.to_dict()))}
    assert build_file(model)[1] == path.read_bytes()  # the same model, the same bytes


def test_a_config_record_rebuilds_only_a_trusted_class_with_a_config_class(trained, tmp_path):
    _, model, _ = trained
    config = model.config.to_dict()
    with pytest.raises(ValueError, match="is not a class with a config_class"):
        load_compressed(_resaved(model, tmp_path / "a.dcz", {"callable": "lm_nets:tiny_gpt2", "config": config}),
                        trusted=["lm_nets.*"])
    with pytest.raises(ValueError, match="nothing was imported"):
        load_compressed(_resaved(model, tmp_path / "b.dcz", {"callable": "lm_nets:Block", "config": config}))


def _resaved(model: nn.Module, path: Path, builder: dict) -> Path:
    save_compressed(model, path, builder=builder)
    return path


def test_file_ratio(trained):
    """The README's numbers: dense fp32 bytes of the unique parameters (the tied lm_head once) against the file's
    bytes, and [DC]'s accounting for the compressed matrices (their dense fp32 bytes against their payloads). At this
    size the JSON header (~14 KB: one record per tensor) and, for GPT-2, the tied lm_head stored again at fp32
    (12 KB) weigh as much as the compressed matrices."""
    name, model, path = trained
    dense = sum(p.numel() * 4 for p in model.parameters())
    size = path.stat().st_size
    compressed = set(read_compressed(path).layers)
    rows = [r for r in compression_report(path).layers if r.name in compressed]
    matrices = sum(r.size_dense_bytes for r in rows) / sum(r.size_pqh_bytes for r in rows)
    print(f"\n{name}: {dense:,} B dense fp32 / {size:,} B file = {dense / size:.2f}x; matrices {matrices:.1f}x")
    assert dense / size >= {"gpt2": 2.9, "llama": 3.8}[name] and matrices >= 9.5


# ------------------------------------------------------------------------------------ converted and generate


@pytest.mark.parametrize("checked", [False, True], ids=["plain", "example_inputs"])
def test_every_matrix_is_converted_and_outputs_match_the_reloaded_model(trained, checked):
    name, _, path = trained
    dense = load_compressed(path, trusted=TRUSTED).eval()
    ids = torch.tensor([[4, 9, 30, 31, 32, 33, 70]])
    converted = to_compressed_inference(dense, example_inputs=ids if checked else None, tolerance=1e-5)
    compressed = kinds.compressed_module_types()
    for target in select_targets(dense):
        assert isinstance(converted.get_submodule(target), compressed), target
    conv1d = [n for n, m in converted.named_modules() if isinstance(m, CompressedConv1D)]
    assert len(conv1d) == (8 if name == "gpt2" else 0)
    # GPT-2's lm_head is tied to wte: converted once, both run from the same codes; no dense matrix is left
    assert [n for n, p in converted.named_parameters() if p.dim() >= 2] == []
    if name == "gpt2":
        assert isinstance(converted.lm_head, CompressedLinear)
    with torch.no_grad():
        assert _rel(converted(ids).logits, dense(ids).logits) <= 1e-5


@pytest.mark.parametrize("name", sorted(BUILD))
def test_the_source_check_reads_hf_forwards_and_still_catches_a_weight_read(name):
    """Hugging Face's own forwards read no projection weight: nothing is blocked. A user's subclass whose forward reads
    ``self.c_fc.weight`` keeps that layer dense (and only that one)."""
    model = BUILD[name]()
    prune_model(model, densities=0.5)
    quantize_model(model, max_iter=0)
    assert {d.action for d in plan_conversion(model) if d.name != "lm_head"} == {"convert"}
    if name != "gpt2":
        return

    class PeekingMLP(GPT2MLP):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states.to(self.c_fc.weight.dtype))

    block = model.transformer.h[0]
    peeking = PeekingMLP(4 * 32, model.config)
    buffers.install_load_hook(peeking)  # takes the masks and codebooks along
    peeking.load_state_dict(block.mlp.state_dict())
    block.mlp = peeking
    decisions = {d.name: d for d in plan_conversion(model)}
    assert decisions["transformer.h.0.mlp.c_fc"].action == "skip"
    assert "PeekingMLP.forward reads `c_fc.weight`" in decisions["transformer.h.0.mlp.c_fc"].reason
    assert decisions["transformer.h.0.mlp.c_proj"].action == decisions["transformer.h.1.mlp.c_fc"].action == "convert"


def test_generate_gives_the_dense_greedy_tokens(trained):
    _, _, path = trained
    dense = load_compressed(path, trusted=TRUSTED).eval()
    want = _greedy(dense)
    assert want == PROMPT + list(range(8, 16))  # it learnt to count, pruned to 30 % and quantized to 5 bits
    assert _greedy(to_compressed_inference(dense)) == want


def test_cli_generate_prints_the_dense_greedy_tokens(trained, capsys):
    _, _, path = trained
    want = _greedy(load_compressed(path, trusted=TRUSTED).eval())
    argv = [str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--tokens", "8", "--temperature", "0",
            "--trusted", "transformers.*", "--device", "cpu"]
    assert cli_generate(argv) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want

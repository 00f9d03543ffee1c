"""``dc-lightning generate`` and ``lm.sample``: a compressed LM that memorised a pattern continues it."""

import pytest
import torch
import torch.nn.functional as F

from dc_lightning.cli.generate import cli_generate
from dc_lightning.data.text import ByteTokenizer
from dc_lightning.io import save_compressed
from dc_lightning.models.lm import sample
from dc_lightning.module import LanguageModule
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.codebooks import quantize_model

PATTERN = "0123456789"


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny LSTM LM trained to continue PATTERN, pruned to 50 %, quantized to 6 bits, written as a .dcz."""
    torch.manual_seed(0)
    module = LanguageModule(model={"name": "lstm_lm", "embed_dim": 16, "hidden_size": 32}, optimizer="adam", lr=1e-2)
    ids = ByteTokenizer().encode(PATTERN * 8)
    starts = torch.arange(0, 40)
    x = torch.stack([ids[s: s + 24] for s in starts])
    y = torch.stack([ids[s + 1: s + 25] for s in starts])
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(module(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    prune_model(module, densities=0.5)
    quantize_model(module, bits=6)
    path = tmp_path_factory.mktemp("gen") / "lm.dcz"
    save_compressed(module, path)
    return path


def test_generate_continues_the_pattern_through_the_compressed_path(memorised, capsys):
    assert cli_generate([str(memorised), "--prompt", "3456", "--tokens", "12", "--temperature", "0",
                         "--device", "cpu"]) == 0
    compressed = capsys.readouterr().out
    assert compressed == "3456" + "789012345678" + "\n"
    assert cli_generate([str(memorised), "--prompt", "3456", "--tokens", "12", "--temperature", "0", "--dense",
                         "--device", "cpu"]) == 0
    assert capsys.readouterr().out == compressed


def test_sample_is_seeded_and_checks_its_arguments():
    torch.manual_seed(0)
    model = LanguageModule(model={"name": "transformer_lm", "width": 16, "num_layers": 1, "num_heads": 2,
                                  "max_len": 8}).eval()
    prompt = ByteTokenizer().encode("hello")
    a = sample(model, prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = sample(model, prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (20,) and torch.equal(a, b)  # 25 tokens > max_len 8: the context is cut to the last 8
    with pytest.raises(ValueError, match="non-empty"):
        sample(model, torch.empty(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, prompt, 3, top_k=0)


def test_generate_rejects_a_classifier_file(tmp_path, capsys):
    from dc_lightning.models import build_model

    net = build_model("lenet300")
    prune_model(net, densities=0.5)
    save_compressed(net, tmp_path / "clf.dcz")
    assert cli_generate([str(tmp_path / "clf.dcz"), "--prompt", "x", "--device", "cpu"]) != 0
    assert "not a byte-level language model" in capsys.readouterr().err

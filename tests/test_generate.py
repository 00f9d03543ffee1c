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
    assert "not a language model" in capsys.readouterr().err


def _user_lm_file(tmp_path, record: bool):
    """A nanoGPT-style model of the user's own (tests/lm_nets.py), pruned + quantized, saved with or without a
    builder record that names it."""
    from lm_nets import NanoGPT

    torch.manual_seed(0)
    net = NanoGPT(vocab=64).eval()
    prune_model(net, densities=0.5)
    quantize_model(net, bits=4)
    if record:
        net.dc_builder = {"callable": "lm_nets:NanoGPT", "kwargs": {"vocab": 64}}
    path = tmp_path / "user.dcz"
    save_compressed(net, path)
    return net, path


def test_generate_runs_a_users_model_with_model_or_trusted(tmp_path, capsys):
    net, path = _user_lm_file(tmp_path, record=True)
    want = sample(net, torch.tensor([3, 1, 4]), 6, temperature=0).tolist()
    # the file's record names lm_nets:NanoGPT, which is not on the allowlist: refused, nothing imported
    assert cli_generate([str(path), "--prompt-ids", "3,1,4", "--tokens", "6", "--device", "cpu"]) == 2
    assert "trusted=['lm_nets.*']" in capsys.readouterr().err
    for extra in (["--trusted", "lm_nets.*"], ["--model", "lm_nets:NanoGPT", "--model-kwargs", '{"vocab": 64}']):
        assert cli_generate([str(path), "--prompt-ids", "3,1,4", "--tokens", "6", "--temperature", "0",
                             "--device", "cpu", *extra]) == 0
        assert capsys.readouterr().out.split() == [str(i) for i in [3, 1, 4, *want]]


def test_generate_names_the_fix_for_a_vocabulary_that_is_not_bytes(tmp_path, capsys):
    _, path = _user_lm_file(tmp_path, record=True)
    assert cli_generate([str(path), "--prompt", "hi", "--device", "cpu", "--trusted", "lm_nets.*"]) == 2
    assert "predicts 64 tokens, not 256 bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):  # argparse's own usage error
        cli_generate([str(path), "--prompt-ids", "x1", "--trusted", "lm_nets.*"])
    assert "expected token ids" in capsys.readouterr().err
    assert cli_generate([str(path), "--prompt-ids", "1", "--model-kwargs", "{}"]) == 2
    assert "--model-kwargs needs --model" in capsys.readouterr().err
    assert cli_generate([str(path), "--prompt-ids", "1", "--model", "lm_nets:NoSuchModel"]) == 2
    assert "has no attribute 'NoSuchModel'" in capsys.readouterr().err


def test_generate_does_not_suggest_trusting_a_script(tmp_path, capsys):
    net, path = _user_lm_file(tmp_path, record=True)
    net.dc_builder = {"callable": "__main__:NanoGPT", "kwargs": {}}
    with pytest.warns(UserWarning, match="__main__"):
        save_compressed(net, path, overwrite=True)
    assert cli_generate([str(path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--model pkg.module:builder" in err and "__main__.*" not in err

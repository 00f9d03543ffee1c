"""The LM networks (NeuralTalk's LSTM shapes, a causal decoder-only transformer) and LanguageModule's perplexity."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dc_lightning.models import PAPER_LAYER_NAMES, build_model
from dc_lightning.module import LanguageModule


def test_lstm_lm_has_eie_neuraltalk_shapes():
    m = build_model("lstm_lm")
    lstm = m.lstm
    # EIE's NT-LSTM gate matrix is [W_ih | W_hh | b]: 600 + 600 + 1 = 1201 inputs, 4 x 600 = 2400 gate outputs
    gate = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0, (lstm.bias_ih_l0 + lstm.bias_hh_l0)[:, None]], dim=1)
    assert gate.T.shape == (1201, 2400)
    assert m.embed.weight.shape == (256, 600) and m.decoder.weight.shape == (256, 600)
    assert set(PAPER_LAYER_NAMES["lstm_lm"].values()) == {"embed", "lstm", "decoder"}
    assert m(torch.randint(0, 256, (2, 7))).shape == (2, 7, 256)


def test_transformer_lm_is_causal_and_sized():
    m = build_model("transformer_lm", width=48, num_layers=2, num_heads=3, max_len=16).eval()
    x = torch.randint(0, 256, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 256  # change the future: the first 8 positions' logits must not move
    torch.testing.assert_close(m(x)[:, :8], m(y)[:, :8])
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])
    full = build_model("transformer_lm")
    assert len(full.layers) == 6 and full.layers[0].self_attn.in_proj_weight.shape == (3 * 384, 384)
    assert full.layers[0].self_attn.num_heads == 6
    with pytest.raises(ValueError, match="max_len = 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_build_model_lm_errors_and_builder_record():
    with pytest.raises(ValueError, match=r"takes no argument \['hidden'\]"):
        build_model("lstm_lm", hidden=3)
    with pytest.raises(ValueError, match="not divisible"):
        build_model("transformer_lm", width=10, num_heads=3)
    with pytest.raises(ValueError, match="vocab_size, not num_classes"):
        build_model("lstm_lm", num_classes=10)
    with pytest.raises(ValueError, match="language-model sizes"):
        build_model("lenet300", width=3)
    rec = build_model("lstm_lm", hidden_size=8, embed_dim=4).dc_builder
    again = build_model(**rec["kwargs"])
    assert again.lstm.hidden_size == 8 and again.embed.embedding_dim == 4


def test_perplexity_is_exp_of_the_token_weighted_mean_nll():
    torch.manual_seed(0)
    module = LanguageModule(model={"name": "lstm_lm", "embed_dim": 8, "hidden_size": 8}, optimizer="adam", lr=1e-3)
    x = torch.randint(0, 256, (10, 6))
    y = torch.randint(0, 256, (10, 6))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4, 2: a plain mean of batches is wrong
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (metrics,) = trainer.test(module, loader, verbose=False)
    with torch.no_grad():
        nll = F.cross_entropy(module(x).flatten(0, 1), y.flatten()).item()
    assert metrics["test/ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert LanguageModule.main_metric == "ppl" and module.dc_builder["callable"] == "dc_lightning.module:LanguageModule"

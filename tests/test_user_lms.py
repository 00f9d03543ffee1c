"""Issue 22's bidirectional GRU tagger over packed, unsorted variable-length sequences (tests/lm_nets.py), end to end
as a user runs it: default targets, the file, the reload and the converted model with and without example inputs."""

import torch
from lm_nets import PackedBiGRU

from dc_lightning import load_compressed, save_compressed, select_targets, to_compressed_inference
from dc_lightning.inference.recurrent import CompressedGRU
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.codebooks import quantize_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_packed_bigru_compresses_reloads_and_converts(tmp_path) -> None:
    torch.manual_seed(0)
    net = PackedBiGRU().eval()
    two_d = {n.removesuffix(".weight") for n, p in net.named_parameters() if p.dim() == 2}
    assert set(select_targets(net)) == two_d  # every weight matrix is a default target (names as the file's)
    prune_model(net, densities=0.4)
    quantize_model(net, bits=4)
    path = tmp_path / "gru.dcz"
    save_compressed(net, path)
    back = load_compressed(path, model=PackedBiGRU())
    got = back.state_dict()
    assert set(got) == set(net.state_dict())
    for name, a in net.state_dict().items():
        assert torch.equal(a, got[name]), name
    idx, lengths = torch.randint(0, 40, (4, 9)), torch.tensor([9, 3, 6, 1])  # unsorted: enforce_sorted=False
    with torch.no_grad():
        want = back(idx, lengths)
        for example in (None, (idx, lengths)):
            conv = to_compressed_inference(back, example_inputs=example, tolerance=1e-5)
            assert isinstance(conv.gru, CompressedGRU)
            assert _rel(conv(idx, lengths), want) <= 1e-5

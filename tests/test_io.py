"""The compressed file: bit-exact round trips, rebuild from builder, no pickle, atomic writes, corruption."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save as st_save
from torch import nn

from dc_lightning.cli.export import cli_decompress, cli_export
from dc_lightning.dcz import CorruptFileError, read_compressed
from dc_lightning.dcz.container import assemble
from dc_lightning.io import ModelMismatchError, decompress, load_compressed, save_compressed


def compress_layer(m: nn.Module, bits: int | None, density: float | None, seed: int = 0) -> None:
    """Set the docs/DESIGN.md buffers directly: weight = where(mask, codebook[assign], 0)."""
    g = torch.Generator().manual_seed(seed)
    w = m.weight.data
    mask = torch.ones_like(w, dtype=torch.bool)
    if density is not None:
        mask = torch.rand(w.shape, generator=g) < density
        m.register_buffer("weight_mask", mask)
    if bits is not None:
        cb = torch.randn(2**bits, generator=g)
        assign = torch.randint(0, 2**bits, w.shape, generator=g).to(torch.uint8)
        assign[~mask] = 0
        m.register_buffer("weight_codebook", cb)
        m.register_buffer("weight_assign", assign)
        w.copy_(torch.where(mask, cb[assign.long()], 0.0))
    else:
        w.copy_(torch.where(mask, w, 0.0))  # +0.0 at pruned positions (a -0.0 from mul_ loads back as +0.0)


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 40),
        nn.ReLU(),
        nn.Linear(40, 10),
    )


def compressed_tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = tiny_net()
    compress_layer(net[0], 8, 0.6, seed)
    compress_layer(net[4], 5, 0.1, seed + 1)
    compress_layer(net[6], None, 0.3, seed + 2)  # pruned only
    net[1].running_mean.normal_()
    return net


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
        if sa[k].is_floating_point():  # bit for bit, -0.0 vs 0.0 included
            assert torch.equal(
                sa[k].view(torch.int32 if sa[k].dtype == torch.float32 else torch.int16),
                sb[k].view(torch.int32 if sb[k].dtype == torch.float32 else torch.int16),
            ), k


# ------------------------------------------------------------------------------------------------ round trips


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 30),
    cols=st.integers(1, 30),
    bits=st.integers(1, 8),
    index_bits=st.integers(2, 8),
    density=st.sampled_from([0.0, 0.03, 0.3, 0.9, 1.0]),
    quant=st.booleans(),
    prune=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_round_trip_random_layers(tmp_path, rows, cols, bits, index_bits, density, quant, prune, seed):
    if not (quant or prune):
        prune = True
    lin = nn.Linear(cols, rows)
    compress_layer(lin, bits if quant else None, density if prune else None, seed)
    path = tmp_path / f"l{seed}.dcz"
    save_compressed(lin, path, index_bits=index_bits, overwrite=True)
    fresh = nn.Linear(cols, rows)
    load_compressed(path, model=fresh)
    assert_same_state(lin, fresh)
    cf = read_compressed(path)
    layer = cf.layers[""]
    assert layer.nnz == (int(lin.weight_mask.sum()) if prune else rows * cols)
    if prune:
        assert layer.index_bits == index_bits
    if quant:
        assert layer.bits == bits
        assert np.array_equal(layer.codes, lin.weight_assign.numpy()[layer.rows, layer.cols])


def test_round_trip_network_and_report_fields(tmp_path):
    net = compressed_tiny_net()
    rep = save_compressed(net, tmp_path / "n.dcz")
    fresh = tiny_net()
    load_compressed(tmp_path / "n.dcz", model=fresh)
    assert_same_state(net, fresh)
    cf = read_compressed(tmp_path / "n.dcz")
    assert {n: (layer.kind, layer.index_bits) for n, layer in cf.layers.items()} == {
        "0": ("pq", 8),
        "4": ("pq", 5),
        "6": ("p", 5),
    }  # paper defaults: 8 conv, 5 fc [DC §2]
    assert cf.metadata["library_version"] == __import__("dc_lightning").__version__
    assert rep.file_bytes == os.path.getsize(tmp_path / "n.dcz")
    assert rep.total.ratio_pqh > 1


def test_quantized_unpruned_layer_and_all_dense_mask(tmp_path):
    net = tiny_net()
    compress_layer(net[4], 4, None)  # quantized, no mask: every position coded, no index stream
    compress_layer(net[6], 3, 1.0)  # mask all True: gaps all 0
    save_compressed(net, tmp_path / "q.dcz")
    cf = read_compressed(tmp_path / "q.dcz")
    assert cf.layers["4"].kind == "q" and cf.layers["4"].nnz == 40 * 216
    assert cf.layers["6"].kind == "pq" and cf.layers["6"].record["n_fill"] == 0
    fresh = tiny_net()
    load_compressed(tmp_path / "q.dcz", model=fresh)
    assert_same_state(net, fresh)
    assert not hasattr(fresh[4], "weight_mask") or fresh[4].weight_mask is None


def test_index_bits_options(tmp_path):
    net = compressed_tiny_net()
    save_compressed(net, tmp_path / "a.dcz", index_bits={"*": 3, "0": 6})
    cf = read_compressed(tmp_path / "a.dcz")
    assert [cf.layers[n].index_bits for n in ("0", "4", "6")] == [6, 3, 3]
    with pytest.raises(ValueError, match="index_bits"):
        save_compressed(net, tmp_path / "b.dcz", index_bits=13)
    with pytest.raises(ValueError, match="matches no"):
        save_compressed(net, tmp_path / "b.dcz", index_bits={"nope*": 4})
    with pytest.raises(ValueError, match="codebook_dtype"):
        save_compressed(net, tmp_path / "b.dcz", codebook_dtype="int8")


def test_index_bits_auto_keeps_the_smallest_stream(tmp_path):
    """``index_bits="auto"`` picks, per layer, the width whose coded relative-index stream is smallest."""
    net = compressed_tiny_net()
    auto = save_compressed(net, tmp_path / "auto.dcz", index_bits="auto")
    cf = read_compressed(tmp_path / "auto.dcz")
    fixed = {b: read_compressed_sizes(net, tmp_path, b) for b in range(2, 11)}
    for name, layer in cf.layers.items():
        if layer.index_bits is None:
            continue
        best = min(fixed[b][name] for b in fixed)
        assert fixed[layer.index_bits][name] == best, (name, layer.index_bits)
    assert (tmp_path / "auto.dcz").stat().st_size <= min((tmp_path / f"w{b}.dcz").stat().st_size for b in fixed)
    fresh = tiny_net()
    load_compressed(tmp_path / "auto.dcz", model=fresh)
    assert_same_state(net, fresh)
    assert auto.total.ratio_pqh > 0
    # per layer, mixed with fixed widths; bad values name the layer and the valid choices
    save_compressed(net, tmp_path / "mixed.dcz", index_bits={"*": "auto", "0": 6})
    assert read_compressed(tmp_path / "mixed.dcz").layers["0"].index_bits == 6
    with pytest.raises(ValueError, match=r"layer '0'.*'automatic'.*'auto'"):
        save_compressed(net, tmp_path / "bad.dcz", index_bits={"*": 4, "0": "automatic"})


def read_compressed_sizes(net: nn.Module, tmp_path, bits: int) -> dict[str, int]:
    """Bytes of each layer's relative-index stream when the file is written with ``bits``-bit indices."""
    path = tmp_path / f"w{bits}.dcz"
    save_compressed(net, path, index_bits=bits)
    out = {}
    for name, layer in read_compressed(path).layers.items():
        if layer.index_bits is not None:
            out[name] = sum(layer.record["gap"][sec][1] for sec in ("lengths", "sync", "data"))
    return out


def test_fp16_storage_options(tmp_path):
    net = compressed_tiny_net()
    r32 = save_compressed(net, tmp_path / "a.dcz")
    r16 = save_compressed(net, tmp_path / "b.dcz", codebook_dtype="float16", dense_dtype="float16")
    assert r16.file_bytes < r32.file_bytes
    fresh = load_compressed(tmp_path / "b.dcz", model=tiny_net())
    cb = net[0].weight_codebook
    assert torch.equal(fresh[0].weight_codebook, cb.half().float())
    assert torch.allclose(fresh[6].weight, net[6].weight, atol=1e-3)


def test_invariant_violation_is_reported(tmp_path):
    net = compressed_tiny_net()
    with torch.no_grad():
        net[4].weight[~net[4].weight_mask.bool()] = 1.0  # weight outside the mask
    with pytest.raises(ValueError, match="outside weight_mask"):
        save_compressed(net, tmp_path / "x.dcz")
    save_compressed(net, tmp_path / "x.dcz", strict=False)
    fresh = load_compressed(tmp_path / "x.dcz", model=tiny_net())
    assert torch.equal(fresh[4].weight, torch.where(net[4].weight_mask, net[4].weight, 0.0))


def test_live_model_not_mutated(tmp_path):
    net = compressed_tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    save_compressed(net, tmp_path / "n.dcz")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------------ builder / rebuild


def test_rebuild_from_dc_builder(tmp_path):
    from dc_lightning.models import build_model

    net = build_model("lenet300")
    compress_layer(net.get_submodule(next(n for n, m in net.named_modules() if isinstance(m, nn.Linear))), 6, 0.08)
    save_compressed(net, tmp_path / "l.dcz")
    rebuilt = load_compressed(tmp_path / "l.dcz")
    assert type(rebuilt) is type(net)
    assert_same_state(net, rebuilt)


def test_rebuild_from_class_path_and_untrusted_builder(tmp_path):
    lin = nn.Linear(7, 5)
    compress_layer(lin, 2, 0.5)
    save_compressed(
        lin,
        tmp_path / "a.dcz",
        builder={"callable": "torch.nn:Linear", "kwargs": {"in_features": 7, "out_features": 5}},
    )
    assert_same_state(lin, load_compressed(tmp_path / "a.dcz", trusted=["torch.nn.*"]))
    save_compressed(lin, tmp_path / "b.dcz", builder={"callable": "os:system", "kwargs": {"command": "true"}})
    with pytest.raises(ValueError, match="neither an nn.Module class"):
        load_compressed(tmp_path / "b.dcz")


def test_lightning_module_builder_from_hparams(tmp_path):
    from dc_lightning.module import ClassifierModule

    mod = ClassifierModule(model={"name": "lenet300"})
    first = mod.model.get_submodule(next(n for n, m in mod.model.named_modules() if isinstance(m, nn.Linear)))
    compress_layer(first, 5, 0.1)
    save_compressed(mod, tmp_path / "m.dcz")
    rebuilt = load_compressed(tmp_path / "m.dcz")
    assert isinstance(rebuilt, ClassifierModule)
    assert_same_state(mod, rebuilt)


# -------------------------------------------------------------------------------------- file hygiene / safety


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    save_compressed(compressed_tiny_net(), tmp_path / "n.dcz")
    with safe_open(str(tmp_path / "n.dcz"), framework="numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "dc-lightning-compressed" and meta["format_version"] == "1"
        doc = json.loads(meta["dc_lightning"])
        assert all(f.get_tensor(k).dtype == np.uint8 for k in f.keys())
    assert {"layers", "tensors", "builder", "library_version"} <= doc.keys()
    assert all(len(r["sha256"]) == 64 for r in doc["layers"] + doc["tensors"])
    raw = (tmp_path / "n.dcz").read_bytes()
    assert b"\x80\x04\x95" not in raw[:64] and not raw.startswith(b"PK")  # no pickle / zip (torch.save) header


def test_refuses_to_overwrite(tmp_path):
    net = compressed_tiny_net()
    save_compressed(net, tmp_path / "n.dcz")
    with pytest.raises(FileExistsError, match="n.dcz"):
        save_compressed(net, tmp_path / "n.dcz")
    save_compressed(net, tmp_path / "n.dcz", overwrite=True)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "n.dcz"
    save_compressed(compressed_tiny_net(0), path)
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(compressed_tiny_net(1), path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.dcz"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------- corruption


def _split(raw: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load

    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    return meta, load(raw)


def _rewrite(path, edit_doc=None, edit_meta=None, edit_tensors=None):
    meta, tensors = _split(path.read_bytes())
    doc = json.loads(meta["dc_lightning"])
    if edit_doc:
        edit_doc(doc)
    meta["dc_lightning"] = json.dumps(doc)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:  # a payload of another dtype: a plain safetensors file (no header digest)
        edit_tensors(tensors)
        meta.pop("header_sha256")  # else the stale digest rejects the file before the payload checks run
        path.write_bytes(st_save(tensors, metadata=meta))
    else:  # re-sealed with a valid header digest, so the checks behind it are exercised
        path.write_bytes(assemble(tensors, meta))


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "n.dcz"
    save_compressed(compressed_tiny_net(), path)
    return path


def _corrupt_cases():
    def set_layer(field, value, i=1):
        return lambda d: d["layers"][i].__setitem__(field, value)

    def set_stream(stream, field, value, i=1):
        return lambda d: d["layers"][i][stream].__setitem__(field, value)

    return {
        "unknown version (metadata)": {"edit_meta": lambda m: m.__setitem__("format_version", "2")},
        "unknown version (document)": {"edit_doc": lambda d: d.__setitem__("format_version", 99)},
        "wrong format name": {"edit_meta": lambda m: m.__setitem__("format", "other")},
        "metadata not JSON": {"edit_meta": lambda m: m.__setitem__("dc_lightning", "{not json")},
        "wrong checksum": {"edit_doc": set_layer("sha256", "0" * 64)},
        "huge symbol count": {"edit_doc": set_stream("code", "n", 10**15)},
        "huge nbits": {"edit_doc": set_stream("gap", "nbits", 10**12)},
        "nnz lies": {"edit_doc": set_layer("nnz", 3)},
        "fillers lie": {"edit_doc": set_layer("n_fill", 10**9)},
        "shape lies": {"edit_doc": set_layer("shape", [10**9, 10**9])},
        "section outside payload": {"edit_doc": set_stream("code", "data", [0, 10**9])},
        "negative size": {"edit_doc": set_layer("nbytes", -5)},
        "bad kind": {"edit_doc": set_layer("kind", "zz")},
        "bits vs k": {"edit_doc": set_layer("bits", 3)},
        "index bits out of range": {"edit_doc": set_layer("index_bits", 40)},
        "tensor dtype unknown": {"edit_doc": lambda d: d["tensors"][0].__setitem__("dtype", "complex128")},
        "tensor shape lies": {"edit_doc": lambda d: d["tensors"][0].__setitem__("shape", [10**8])},
        "payload missing": {"edit_tensors": lambda t: t.pop("layer.0000")},
        "payload wrong dtype": {"edit_tensors": lambda t: t.__setitem__("layer.0000", t["layer.0000"].view(np.int8))},
        "layers not a list": {"edit_doc": lambda d: d.__setitem__("layers", {"a": 1})},
    }


# what each corrupt case's error must say (the check that caught it, with the field and the bad value)
_CORRUPT_MESSAGES = {
    "unknown version (metadata)": r"unknown format version '2'; this reader supports 1",
    "unknown version (document)": r"dc_lightning metadata has the wrong format name or version",
    "wrong format name": r"format 'other' is not 'dc-lightning-compressed'",
    "metadata not JSON": r"dc_lightning metadata is missing or not JSON",
    "wrong checksum": r"layer '4': sha256 checksum mismatch",
    "huge symbol count": r"layer '4': code stream holds 1000000000000000 symbols, expected nnz=",
    "huge nbits": r"stream claims 1000000000000 bits but holds \d+ bytes",
    "nnz lies": r"layer '4': code stream holds \d+ symbols, expected nnz=3",
    "fillers lie": r"layer '4': gap stream holds \d+ symbols, expected nnz\+fillers",
    "shape lies": r"layer '4': shape \(1000000000, 1000000000\) is implausibly large",
    "section outside payload": r"layer '4'.code.data: section \[0, 1000000000\) lies outside its \d+-byte payload",
    "negative size": r"layer '4'.nbytes = -5 is not an integer in \[0, ",
    "bad kind": r"layer '4': unknown kind 'zz'",
    "bits vs k": r"layer '4': bits=3 disagrees with codebook size 32",
    "index bits out of range": r"layer '4'.index_bits = 40 is not an integer in \[1, 12\]",
    "tensor dtype unknown": r"tensor '0.bias': unknown dtype 'complex128'",
    "tensor shape lies": r"tensor '0.bias': payload size disagrees with shape \(100000000,\)",
    "payload missing": r"layer '0': payload tensor 'layer.0000' is missing",
    "payload wrong dtype": r"layer '0': payload 'layer.0000' has the wrong dtype/shape/size",
    "layers not a list": r"metadata lacks the layers/tensors lists",
}


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_corrupt_metadata_raises(good_file, case):
    assert set(_CORRUPT_MESSAGES) == set(_corrupt_cases())
    _rewrite(good_file, **_corrupt_cases()[case])
    with pytest.raises(CorruptFileError, match=_CORRUPT_MESSAGES[case]):
        load_compressed(good_file, model=tiny_net())


def test_truncated_and_flipped_files(good_file):
    raw = good_file.read_bytes()
    for cut, match in ((0, "0 bytes is too short"), (5, "5 bytes is too short"), (8, "header claims .* holds 0 "),
                       (100, "header claims .* holds 92 "), (len(raw) // 2, rf"holds {len(raw) // 2 - 8} \(truncated"),
                       (len(raw) - 1, "safetensors payload is inconsistent")):
        good_file.write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError, match=match):
            read_compressed(good_file)
    flipped = bytearray(raw)
    flipped[-20] ^= 0x40  # inside the last payload: checksum
    good_file.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match="checksum"):
        read_compressed(good_file)
    good_file.write_bytes(struct.pack("<Q", 2**40) + raw[8:])  # header length lies
    with pytest.raises(CorruptFileError, match="header"):
        read_compressed(good_file)


def test_missing_layer_and_shape_mismatch(good_file, tmp_path):
    _rewrite(good_file, edit_doc=lambda d: d["layers"].pop(0))
    with pytest.raises(ModelMismatchError, match="missing from the file"):
        load_compressed(good_file, model=tiny_net())
    path = tmp_path / "m.dcz"
    save_compressed(compressed_tiny_net(), path)
    other = tiny_net()
    other[4] = nn.Linear(6 * 6 * 6, 41)
    with pytest.raises(ModelMismatchError, match="shape"):
        load_compressed(path, model=other)
    with pytest.raises(ModelMismatchError, match="does not exist in the model"):
        load_compressed(path, model=nn.Sequential(nn.Conv2d(3, 6, 3)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    base = d / "base.dcz"
    if not base.exists():
        save_compressed(compressed_tiny_net(), base)
    raw = bytearray(base.read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "splice", "header"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "splice":
        a = data.draw(st.integers(0, len(raw)))
        b = data.draw(st.integers(0, len(raw)))
        raw = raw[:a] + raw[b : b + data.draw(st.integers(0, 200))] + raw[a:]
    else:  # flip inside the JSON header, where structure lives
        (n,) = struct.unpack("<Q", bytes(raw[:8]))
        i = data.draw(st.integers(8, 8 + n - 1))
        raw[i] = data.draw(st.sampled_from(list(b'0123456789[]{},:"-e.')))
    path = d / "mut.dcz"
    path.write_bytes(bytes(raw))
    try:
        model = load_compressed(path, model=tiny_net())
    except CorruptFileError:
        return
    # a clean load must be the original model (checksums make silent payload changes impossible)
    assert_same_state(model, load_compressed(base, model=tiny_net()))


# ------------------------------------------------------------------------------------- decompress and CLIs


def test_decompress_and_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    net = compressed_tiny_net()
    save_compressed(net, tmp_path / "n.dcz")
    decompress(tmp_path / "n.dcz", tmp_path / "dense.safetensors")
    plain = tiny_net()
    plain.load_state_dict(load_file(str(tmp_path / "dense.safetensors")))  # strict: no compression buffers
    for k, v in plain.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert cli_decompress([str(tmp_path / "n.dcz"), str(tmp_path / "d2.safetensors")]) == 0
    a, b = load_file(str(tmp_path / "d2.safetensors")), load_file(str(tmp_path / "dense.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cli_decompress([str(tmp_path / "n.dcz"), str(tmp_path / "d2.safetensors")]) == 2  # exists: usage error
    assert "d2.safetensors exists; pass --overwrite" in capsys.readouterr().err


def test_cli_export_lightning_checkpoint(tmp_path, capsys):
    from dc_lightning.cli import main

    lin = nn.Linear(9, 4)
    compress_layer(lin, 3, 0.4)
    torch.save(
        {"state_dict": lin.state_dict(), "hyper_parameters": {"in_features": 9, "out_features": 4}, "epoch": 0},
        tmp_path / "x.ckpt",
    )
    assert (
        main(
            [
                "export",
                str(tmp_path / "x.ckpt"),
                str(tmp_path / "x.dcz"),
                "--model-class",
                "torch.nn:Linear",
                "--index-bits",
                "4",
            ]
        )
        == 0
    )
    rebuilt = load_compressed(tmp_path / "x.dcz", trusted=["torch.nn.*"])
    assert_same_state(lin, rebuilt)
    assert read_compressed(tmp_path / "x.dcz").layers[""].index_bits == 4
    assert cli_export([str(tmp_path / "x.ckpt"), str(tmp_path / "y.dcz")]) == 2  # no --model-class
    args = [str(tmp_path / "x.ckpt"), str(tmp_path / "z.dcz"), "--model-class", "torch.nn:Linear"]
    assert main(["export", *args, "--index-bits", "auto"]) == 0
    assert 2 <= read_compressed(tmp_path / "z.dcz").layers[""].index_bits <= 10
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(["export", *args, "--index-bits", "five"])
    assert "'five': expected an int in 1..12 or 'auto'" in capsys.readouterr().err


def test_fixed_width_fallback_for_tiny_layers(tmp_path):
    """A tiny 8-bit layer: the 256-byte code-length table would outweigh Huffman's gain, so the codes go fixed-width
    with a one-byte table; the file still round-trips bit for bit."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 10, bias=False)
    mask = torch.rand(10, 20) < 0.7
    cb = torch.linspace(-1, 1, 256)
    assign = torch.randint(0, 256, (10, 20), dtype=torch.uint8)
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", cb)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, cb[assign.long()], 0.0))
    rep = save_compressed(lin, tmp_path / "t.dcz", index_bits=5)
    (row,) = rep.layers
    nnz = int(mask.sum())
    assert row.weight_bits_pqh == pytest.approx(8.0)  # fixed width, not a Huffman code
    # payload: codebook (1 KiB) + 1-byte table + nnz bytes of codes + gap stream; far below a 256-byte table
    assert row.size_pqh_bytes < 1024 + nnz + 256
    back = load_compressed(tmp_path / "t.dcz", model=nn.Linear(20, 10, bias=False))
    assert torch.equal(back.weight, lin.weight)

"""The file format's versioning rule (``dc_lightning.dcz.container``, docs/DESIGN.md "File format versioning"):
readers of a version ignore fields they do not know, every optional field has a default under which a file lacking
it loads with the same numbers, and a file of another version is refused by its version."""

import json
import logging
import struct

import pytest
import torch
from torch import nn

from dc_lightning.dcz import CorruptFileError, build_file, read_compressed
from dc_lightning.dcz.container import (
    DEFAULT_PARAM,
    FORMAT_VERSION,
    HEADER_DIGEST,
    OPTIONAL_FIELDS,
    assemble,
    load_payloads,
)
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.codebooks import quantize_model


def _file() -> bytes:
    """A pruned+quantized Linear, a pruned-only LSTM (parameters other than ``weight``) and a plain bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 6), nn.LSTM(6, 4))
    prune_model(model, densities=0.5)
    quantize_model(model, bits=3, include=["0"])
    return build_file(model)[1]


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _resealed(data: bytes, edit_meta=None, edit_doc=None) -> bytes:
    """The file with its safetensors metadata and/or its document edited, the header digest recomputed."""
    header, _ = _split(data)
    meta = header["__metadata__"]
    doc = json.loads(meta["dc_lightning"])
    if edit_doc is not None:
        edit_doc(doc)
    meta["dc_lightning"] = json.dumps(doc)
    if edit_meta is not None:
        edit_meta(meta)
    return assemble(load_payloads(data, "f"), meta)


def _without_digest(data: bytes) -> bytes:
    header, body = _split(data)
    del header["__metadata__"][HEADER_DIGEST]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _same_contents(a, b) -> bool:
    if set(a.layers) != set(b.layers) or set(a.tensors) != set(b.tensors):
        return False
    sa, sb = a.dense_state_dict(with_buffers=True), b.dense_state_dict(with_buffers=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_unknown_fields_are_ignored(tmp_path):
    data = _file()
    want = read_compressed(_write(tmp_path, "a.dcz", data))

    def add_fields(doc: dict) -> None:
        doc["future_field"] = {"x": 1}
        for rec in doc["layers"] + doc["tensors"]:
            rec["future_field"] = [1, 2, 3]

    edited = _resealed(data, edit_meta=lambda m: m.__setitem__("future_meta", "y"), edit_doc=add_fields)
    assert edited != data
    got = read_compressed(_write(tmp_path, "b.dcz", edited))
    assert got.metadata["future_field"] == {"x": 1}
    assert _same_contents(got, want)


@pytest.mark.parametrize("field", sorted(OPTIONAL_FIELDS))
def test_a_file_without_an_optional_field_loads_with_the_same_numbers(tmp_path, caplog, field):
    data = _file()
    want = read_compressed(_write(tmp_path, "a.dcz", data))
    if field == HEADER_DIGEST:
        older = _without_digest(data)
        assert HEADER_DIGEST.encode() not in older
    elif field == "config":  # a builder-record field (a Hugging Face model's config): no tensor depends on it
        data = _resealed(data, edit_doc=lambda d: d["builder"].__setitem__("config", {"n_embd": 6}))
        want = read_compressed(_write(tmp_path, "a.dcz", data))
        assert want.builder["config"] == {"n_embd": 6}
        older = _resealed(data, edit_doc=lambda d: d["builder"].pop("config"))
    elif field == "aliases":
        # a model without tied weights gets no aliases field (the default {}): its files keep their bytes; a tied
        # model's file without it is tests/test_tied.py's (an older reader refuses it, never a wrong number)
        assert "aliases" not in json.loads(_split(data)[0]["__metadata__"]["dc_lightning"])
        older = data
    else:
        assert field == "param"
        # only the LSTM's records name a parameter other than the default: drop the field where it is the default
        assert {rec.get("param") for rec in json.loads(_split(data)[0]["__metadata__"]["dc_lightning"])["layers"]} \
            == {DEFAULT_PARAM, "weight_ih_l0", "weight_hh_l0"}

        def drop(doc: dict) -> None:
            for rec in doc["layers"]:
                if rec["param"] == DEFAULT_PARAM:
                    del rec["param"]

        older = _resealed(data, edit_doc=drop)
    with caplog.at_level(logging.WARNING):
        got = read_compressed(_write(tmp_path, "b.dcz", older))
    assert _same_contents(got, want)
    assert ("NOT verified" in caplog.text) is (field == HEADER_DIGEST)


def test_another_format_version_is_refused_by_its_version(tmp_path):
    data = _file()
    for edit in (dict(edit_meta=lambda m: m.__setitem__("format_version", str(FORMAT_VERSION + 1))),
                 dict(edit_doc=lambda d: d.__setitem__("format_version", FORMAT_VERSION + 1))):  # fmt: skip
        with pytest.raises(CorruptFileError, match="version"):
            read_compressed(_write(tmp_path, "v.dcz", _resealed(data, **edit)))

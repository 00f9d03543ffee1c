"""Files and arguments a real user hands in (issue 14): lying headers, files from elsewhere, models that cannot be
rebuilt, unverified reports, bad callback arguments, CLI mistakes, byte-identical files, one line per log message."""

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dc_lightning.cli import main
from dc_lightning.dcz import CorruptFileError, huffman
from dc_lightning.dcz.container import assemble
from dc_lightning.io import ModelMismatchError, load_compressed, save_compressed
from dc_lightning.report import compression_report

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    mask = net[0].weight.abs() > 0.15
    with torch.no_grad():
        net[0].weight.masked_fill_(~mask, 0.0)
        cb = torch.linspace(-0.5, 0.5, 8)
        assign = torch.randint(0, 8, net[2].weight.shape, dtype=torch.uint8)
        net[2].weight.copy_(cb[assign.long()])
    net[0].register_buffer("weight_mask", mask)
    net[2].register_buffer("weight_codebook", cb)
    net[2].register_buffer("weight_assign", assign)
    return net


def _fresh() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


def _header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite_header(path: Path, edit, reseal: bool = False) -> None:
    """Change the document and re-serialise the header with a valid length (and, with ``reseal``, a valid digest)."""
    header, data = _header(path.read_bytes())
    meta = header["__metadata__"]
    doc = json.loads(meta["dc_lightning"])
    edit(doc)
    meta["dc_lightning"] = json.dumps(doc)
    if reseal:
        payloads = {k: np.frombuffer(data[v["data_offsets"][0] : v["data_offsets"][1]], np.uint8)
                    for k, v in header.items() if k != "__metadata__"}
        path.write_bytes(assemble(payloads, meta))
        return
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


# ------------------------------------------------------------------------------------ 2. lying headers


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["layers"][1]["codebook"].__setitem__(0, 4),  # the codebook section moved inside its payload
        lambda d: d["layers"][1]["code"].__setitem__("chunk", 7),
        lambda d: d["tensors"][0].__setitem__("dtype", "float16"),  # a tensor's dtype
    ],
    ids=["codebook-section", "code-chunk", "tensor-dtype"],
)
def test_any_header_edit_is_detected(tmp_path, edit):
    path = tmp_path / "n.dcz"
    save_compressed(_net(), path)
    _rewrite_header(path, edit)
    with pytest.raises(CorruptFileError, match="digest"):
        load_compressed(path, model=_fresh())


def test_files_written_before_header_digests_still_load_with_a_warning(tmp_path, caplog):
    """A user's file from an early 0.1.0 build (no header digest) is not lost; a malformed digest is refused."""
    path = tmp_path / "old.dcz"
    save_compressed(_net(), path)
    header, data = _header(path.read_bytes())
    del header["__metadata__"]["header_sha256"]
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    with caplog.at_level(logging.WARNING):
        got = load_compressed(path, model=_fresh())
    assert "NOT verified" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), _net().state_dict().values(), strict=True))
    header["__metadata__"]["header_sha256"] = "xyz"
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    with pytest.raises(CorruptFileError, match="malformed"):
        load_compressed(path, model=_fresh())


def test_resealed_section_and_dtype_lies_are_still_rejected(tmp_path):
    # behind the digest: sections must tile their payload, a tensor's stored dtype must be the writer's
    for edit, match in ((lambda d: d["layers"][1]["codebook"].__setitem__(0, 4),
                         r"layer '2': sections do not tile the payload \(offset 4, expected 0\)"),
                        (lambda d: d["tensors"][0].__setitem__("dtype", "int8"),
                         r"tensor '0.bias': dtype 'int8' cannot be stored as 'float32'")):
        path = tmp_path / "n.dcz"
        save_compressed(_net(), path, overwrite=True)
        _rewrite_header(path, edit, reseal=True)
        with pytest.raises(CorruptFileError, match=match):
            load_compressed(path, model=_fresh())


def test_allocation_bounded_before_decoding(tmp_path, monkeypatch):
    # a re-sealed header declaring 24-bit codes or a huge chunk is refused before the decoder allocates its tables
    path = tmp_path / "n.dcz"
    for edit, match in ((lambda d: d["huffman"].__setitem__("max_len", 24),
                         r"huffman.max_len = 24 is not an integer in \[1, 16\]"),
                        (lambda d: d["layers"][1]["code"].__setitem__("chunk", 65535),
                         r"layer '2'.code: chunk 65535 differs from the file's chunk 1024")):
        save_compressed(_net(), path, overwrite=True)
        _rewrite_header(path, edit, reseal=True)
        monkeypatch.setattr(huffman, "decode_many", lambda s: pytest.fail("decoded a rejected file"))
        with pytest.raises(CorruptFileError, match=match):
            load_compressed(path, model=_fresh())
    # declared shapes are checked against the model before decoding, with their own error type
    save_compressed(_net(), path, overwrite=True)
    other = nn.Sequential(nn.Linear(12, 11), nn.ReLU(), nn.Linear(11, 4))
    with pytest.raises(ModelMismatchError, match=r"parameter '0.weight'.*\(10, 12\).*\(11, 12\)") as info:
        load_compressed(path, model=other)
    assert not isinstance(info.value, CorruptFileError)


@pytest.mark.slow
def test_structure_aware_fuzz_small(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.storage.fuzz_dcz", "--mutants", "300", "--seed", "3",
                          "--json", str(tmp_path / "f.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    res = json.loads((tmp_path / "f.json").read_text())
    assert out.returncode == 0 and res["failures"] == 0, out.stdout[-2000:]
    assert all(res["counts"][kind].get("loaded DIFFERENT", 0) == 0 for kind in ("byte", "header"))
    assert res["peak_traced_bytes"]["resealed"] <= 2 * res["peak_traced_bytes"]["base"]


# ------------------------------------------------------------------------------- 3. files you did not make


def test_untrusted_builder_is_never_imported(tmp_path, capsys):
    path = tmp_path / "n.dcz"
    save_compressed(_net(), path, builder={"callable": "this:s", "kwargs": {}})
    sys.modules.pop("this", None)
    with pytest.raises(ValueError, match="nothing was imported.*model="):
        load_compressed(path)
    assert "this" not in sys.modules and capsys.readouterr().out == ""  # the Zen of Python was not printed
    save_compressed(_net(), path, overwrite=True, builder={"callable": "torch.nn:Sequential", "kwargs": {}})
    with pytest.raises(ValueError, match=r"trusted=\['torch.nn.\*'\]"):  # any nn.Module of any package: refused too
        load_compressed(path)
    # an allowed module cannot hand out what it merely imports (dc_lightning.models imports torch)
    save_compressed(_net(), path, overwrite=True, builder={"callable": "dc_lightning.models:torch.load", "kwargs": {}})
    with pytest.raises(ValueError, match="allowlist"):
        load_compressed(path, trusted=["dc_lightning.models:*"])


@pytest.mark.parametrize("record", [True, "x", [1, 2]])
def test_a_builder_record_that_is_not_a_mapping_is_a_value_error(tmp_path, record):
    # found by bench/storage/fuzz_dcz.py (re-sealed header with builder: true): an AttributeError escaped before
    path = tmp_path / "n.dcz"
    save_compressed(_net(), path)
    _rewrite_header(path, lambda d: d.__setitem__("builder", record), reseal=True)
    with pytest.raises(ValueError, match="not a mapping.*model="):
        load_compressed(path)


def test_trusted_opt_in(tmp_path):
    path = tmp_path / "n.dcz"
    net = _net()
    spec = {"callable": "tests_user_errors_builders:build", "kwargs": {}}
    (tmp_path / "tests_user_errors_builders.py").write_text(
        "import torch.nn as nn\n\n\ndef build():\n"
        "    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        save_compressed(net, path, builder=spec)
        with pytest.raises(ValueError, match="allowlist"):
            load_compressed(path)
        loaded = load_compressed(path, trusted=["tests_user_errors_builders.*"])
        pairs = zip(loaded.state_dict().values(), net.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tests_user_errors_builders", None)


# -------------------------------------------------------------------------- 4. models that cannot be rebuilt


class Wide(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(6, width)


def test_rebuild_problems_warn_at_save_and_say_model_at_load(tmp_path):
    m = Wide(width=9)
    with torch.no_grad():
        m.fc.weight[0] = 0.0
    m.fc.register_buffer("weight_mask", m.fc.weight != 0)
    with pytest.warns(UserWarning, match="without arguments.*model=") as rec:
        save_compressed(m, tmp_path / "a.dcz")
        save_compressed(m, tmp_path / "b.dcz")  # once
    assert len([w for w in rec if "rebuild" in str(w.message)]) == 1
    with pytest.raises(ModelMismatchError, match=r"\(9, 6\).*\(4, 6\).*model=") as info:
        load_compressed(tmp_path / "a.dcz", trusted=[f"{__name__}:Wide"])
    assert not isinstance(info.value, CorruptFileError)
    for spec, match in (("__main__:Model", "__main__.*model="), ("no_such_module_x:Model", "cannot import.*model=")):
        save_compressed(m, tmp_path / "c.dcz", overwrite=True, builder={"callable": spec, "kwargs": {}})
        with pytest.raises(ValueError, match=match):
            load_compressed(tmp_path / "c.dcz", trusted=True)


# ------------------------------------------------------------------------------ 5. inspect verifies the file


def test_inspect_and_report_verify_the_file(tmp_path, capsys):
    path = tmp_path / "n.dcz"
    save_compressed(_net(), path)
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-3] ^= 0x10
    for bad, match in ((raw[: len(raw) - 40], "safetensors payload is inconsistent"),
                       (bytes(flipped), r"record '2.bias': sha256 checksum mismatch")):
        path.write_bytes(bad)
        with pytest.raises(CorruptFileError, match=match):
            compression_report(path)
        assert main(["inspect", str(path), "--json"]) == 1
        assert capsys.readouterr().out == ""
    rep = compression_report(path, verify=False)
    assert not rep.verified and "NOT VERIFIED" in rep.to_markdown()
    assert main(["inspect", str(path), "--no-verify", "--markdown"]) == 0
    assert "NOT VERIFIED" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 7. arguments at construction


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: __import__("dc_lightning").CompressedCheckpoint(index_bits=40),
         r"CompressedCheckpoint: index_bits=40; valid: None, an int in 1\.\.12"),
        (lambda: __import__("dc_lightning").CompressedCheckpoint(index_bits={"fc*": 0}),
         r"CompressedCheckpoint: index_bits\['fc\*'\]=0; valid"),
        (lambda: __import__("dc_lightning").CompressedCheckpoint(strict="yes"),
         r"CompressedCheckpoint: strict='yes'; expected True or False"),
        (lambda: __import__("dc_lightning").CompressedCheckpoint(dirpath=3),
         r"CompressedCheckpoint: dirpath=3; expected None or a folder path"),
        (lambda: __import__("dc_lightning").MagnitudePruning(densities=0.5, include="fc1"),
         r"MagnitudePruning: include='fc1'; expected None or a list of fnmatch patterns"),
        (lambda: __import__("dc_lightning").MagnitudePruning(densities=0.5, types=(int,)),
         r"MagnitudePruning: types=\(<class 'int'>,\); expected a non-empty tuple of nn\.Module classes"),
        (lambda: __import__("dc_lightning").MagnitudePruning(densities=0.5, verbose="no"),
         r"MagnitudePruning: verbose='no'; expected True or False"),
        (lambda: __import__("dc_lightning").MagnitudePruning(densities=0.5, prune_fraction=True),
         r"MagnitudePruning: prune_fraction=True; expected a number in \(0, 1\]"),
        (lambda: __import__("dc_lightning").TrainedQuantization(refine=1),
         r"TrainedQuantization: refine=1; expected True or False"),
        (lambda: __import__("dc_lightning").TrainedQuantization(seed=-1),
         r"TrainedQuantization: seed must be an int >= 0, got -1"),
        (lambda: __import__("dc_lightning").TrainedQuantization(exclude=[""]),
         r"TrainedQuantization: exclude=\[''\]; every pattern must be a non-empty string"),
    ],
)
def test_callback_arguments_checked_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_rounds_after_max_epochs_are_reported_at_setup():
    import lightning.pytorch as pl

    from dc_lightning import MagnitudePruning

    cb = MagnitudePruning(densities=0.3, prune_epochs=[0, 3])
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"round\(s\) at epoch\(s\) \[3\].*1 of 2 rounds"):
        cb.setup(trainer, nn.Sequential(nn.Linear(3, 2)), "fit")


# --------------------------------------------------------------------------- 8. the callback's ratio message


def test_compressed_checkpoint_labels_both_ratios(tmp_path, caplog):
    from dc_lightning import CompressedCheckpoint

    with caplog.at_level(logging.INFO):
        rep = CompressedCheckpoint().write(_net(), tmp_path / "n.dcz")
    text = caplog.text
    assert f"{rep.ratio_file:.1f}x smaller than the dense fp32 parameters" in text
    assert f"P+Q+H {rep.total.ratio_pqh:.1f}x" in text and rep.ratio_file != pytest.approx(rep.total.ratio_pqh)


# ------------------------------------------------------------------------------------------ 9. CLI mistakes


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}, "hyper_parameters": {}},
               tmp_path / "good.ckpt")
    (tmp_path / "mymodels_cwd_only.py").write_text("import torch.nn as nn\nclass SmallCNN(nn.Module):\n    pass\n")
    save_compressed(_net(), tmp_path / "exists.dcz")
    cases = [
        (["export", "missing.ckpt", "o.dcz"], "missing.ckpt: no such file"),
        (["export", "random.bin", "o.dcz"], "random.bin is not a Lightning checkpoint"),
        (["inspect", str(tmp_path)], "is a directory"),
        (["export", "good.ckpt", "exists.dcz", "--model-class", "torch.nn:Linear"], "pass --overwrite"),
        (["export", "good.ckpt", "o.dcz", "--model-class", "mymodels_cwd_only.SmallCNN"], "pkg.module:QualName"),
        (["export", "good.ckpt", "o.dcz", "--model-class", "mymodels_cwd_only:SmallCNN"], "PYTHONPATH=."),
        (["decompress", "missing.dcz", "o.safetensors"], "missing.dcz: no such file (expected the .dcz file)"),
        (["decompress", "exists.dcz", "exists.dcz"], "exists.dcz exists; pass --overwrite"),
        (["decompress", "exists.dcz", str(tmp_path)], "is a directory; give the output file's name"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    # a corrupt file is not a usage mistake: status 1, as inspect
    assert main(["decompress", "random.bin", "o.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "random.bin" in err and "not a .dcz file" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_not_a_dcz_says_so(tmp_path):
    ckpt = tmp_path / "model.dcz"
    torch.save({"state_dict": {}}, ckpt)  # a Lightning checkpoint renamed
    with pytest.raises(CorruptFileError, match="not a .dcz file.*zip archive"):
        load_compressed(ckpt, model=_fresh())
    (tmp_path / "r.dcz").write_bytes(bytes(range(255, -1, -1)) * 4)
    with pytest.raises(CorruptFileError, match="not a .dcz file"):
        compression_report(tmp_path / "r.dcz")


def test_header_length_with_a_0x80_low_byte_is_not_a_pickle(tmp_path):
    """A header whose length ends in 0x80 starts with the pickle opcode byte: still a valid file (it was refused)."""
    (tmp_path / "p.pkl").write_bytes(b"\x80\x04\x95" + bytes(64))
    with pytest.raises(CorruptFileError, match="Python pickle"):
        compression_report(tmp_path / "p.pkl")
    for pad in range(300):  # grow the builder record until the header length's low byte is 0x80
        model = _net()
        model.dc_builder = {"callable": "dc_lightning.models:build_model", "kwargs": {"name": "x" * pad}}
        path = tmp_path / f"m{pad}.dcz"
        save_compressed(model, path)
        data = path.read_bytes()
        if data[0] == 0x80:
            break
        path.unlink()
    assert data[0] == 0x80
    got = load_compressed(path, model=_net())
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------- 10. identical bytes


def test_same_model_two_processes_same_bytes(tmp_path):
    code = (
        f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from tests.test_user_errors import _net;"
        "from dc_lightning.io import save_compressed; save_compressed(_net(), sys.argv[1])"
    )
    files = []
    for i in range(3):  # safetensors' own writer ordered the metadata by a per-process random hash
        files.append(tmp_path / f"{i}.dcz")
        subprocess.run([sys.executable, "-c", code, str(files[-1])], check=True, timeout=300, cwd=ROOT)
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()


# ----------------------------------------------------------------------------------- 11. train.py messages


def test_train_logs_one_line_per_message_and_names_compressed_file(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "stage=evaluate", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**__import__("os").environ,
                                                                        "WANDB_MODE": "disabled"},
    )
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "compressed_file=" in text and "Traceback" not in text
    lines = [line.split("] - ")[-1] for line in text.splitlines()]
    assert len(lines) == len(set(lines)), text  # Lightning's handler and Hydra's printed every line twice
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl

    from train import one_line_per_message

    root = logging.getLogger()
    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    root.addHandler(handler)
    try:
        one_line_per_message()
        for _ in range(3):
            pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    finally:
        root.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines and all(lines.count(line) == 1 for line in lines if "GPU available" in line or "Tip" in line)

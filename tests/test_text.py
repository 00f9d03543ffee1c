"""The fortunes corpus, the byte tokenizer, the seeded split and TextDataModule."""

import pytest
import torch
from conftest import needs_fortunes

from dc_lightning.data.text import ByteTokenizer, TextDataModule, fortune_files, read_fortunes, split_corpus, windows


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Caf\u00e9 % \u65e5\u672c\n\ttab"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        tok.decode([65, 300])


def test_read_fortunes_splits_on_percent_lines(tmp_path):
    (tmp_path / "jokes").write_bytes(b"first\nline two\n%\nsecond 50% off\n%\n\n%\nthird\n")
    (tmp_path / "jokes.dat").write_bytes(b"\x00\x01")  # the strfile index is not text
    files = fortune_files(tmp_path)
    assert [p.name for p in files] == ["jokes"]
    assert read_fortunes(files) == [b"first\nline two", b"second 50% off", b"third"]


def test_split_is_seeded_deterministic_and_disjoint():
    fortunes = [f"fortune number {i}".encode() for i in range(2000)]
    a, b = split_corpus(fortunes, seed=3), split_corpus(list(reversed(fortunes)), seed=3)
    sets = {}
    for split in ("train", "val", "test"):
        got = ByteTokenizer().decode(a[split]).split("\n%\n")[:-1]
        assert sorted(got) == sorted(ByteTokenizer().decode(b[split]).split("\n%\n")[:-1])  # order-free
        sets[split] = set(got)
    assert sum(len(s) for s in sets.values()) == 2000 and not sets["train"] & sets["test"]
    assert 1700 < len(sets["train"]) < 1900 and 50 < len(sets["val"]) < 150
    assert split_corpus(fortunes, seed=4)["val"].tolist() != a["val"].tolist()
    with pytest.raises(ValueError, match="data.fractions"):
        split_corpus(fortunes, fractions=(0.9, 0.2, 0.0))


def test_windows_are_shifted_by_one():
    ds = windows(torch.arange(23), 5)
    x, y = ds.tensors
    assert x.shape == (4, 5) and torch.equal(y, x + 1) and x[1, 0] == 5


def test_missing_corpus_names_folder_and_install_command(tmp_path):
    dm = TextDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install fortunes"):
        dm.setup()
    with pytest.raises(ValueError, match="data.seq_len"):
        TextDataModule(seq_len=0)


@needs_fortunes
def test_datamodule_batches_real_fortunes():
    dm = TextDataModule(seq_len=32, batch_size=8, max_bytes=4096)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 32) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert len(dm.splits["val"]) == (4096 - 1) // 32
    xv, _ = next(iter(dm.val_dataloader()))
    text = ByteTokenizer().decode(xv.flatten())
    assert sum(c.isalpha() for c in text) > len(text) // 2  # English text, not noise

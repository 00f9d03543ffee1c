"""The public API: every exported name resolves, imports stay lazy, the console script answers."""

import subprocess
import sys

import dc_lightning
from dc_lightning.cli import SUBCOMMANDS, main


def test_every_public_name_resolves():
    names = [n for n in dc_lightning.__all__ if n != "__version__"]
    assert {"MagnitudePruning", "TrainedQuantization", "CompressedCheckpoint", "save_compressed", "load_compressed",
            "to_compressed_inference", "CompressedLinear", "kmeans_1d", "compression_report"} <= set(names)
    for name in names:
        assert getattr(dc_lightning, name) is not None, name


def test_import_is_lazy():
    code = "import sys, dc_lightning; print('lightning' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_console_script_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS)
    assert main(["nonsense"]) == 2
    assert "valid commands" in capsys.readouterr().err
    for name, (module, _) in SUBCOMMANDS.items():  # every subcommand's handler exists
        mod = __import__(module, fromlist=["_"])
        assert callable(getattr(mod, f"cli_{name}")), name

"""Native CPU decode of compressed weights: ``cpu_decode.c``, compiled on first use with the system's C compiler.

PyTorch has no op that looks a 4-bit code up in a 16-entry table: the pure-PyTorch references widen the code bytes
to an int32 index and gather (``torch.index_select``, serial, about 0.45 ns per byte on the 2-core dev box), which
bounds the CPU path of a 4-bit ``tc`` layer at batch 1 to about 3x the dense ``F.linear`` (bench/RESULTS.md, "CPU
path vs dense"). ``cpu_decode.c`` does the lookup with one SIMD permute per 16 codes (AVX-512) or two per 8 (AVX2),
or a scalar loop elsewhere, for the ``tc`` layout (:func:`decode_tc_rows`) and the 2/4-bit ``lut`` layout with or
without its bitmap (:func:`decode_lut_rows`); the layouts' CPU references then multiply with torch's own ops as
before. It also looks up the rows of an ``ell`` embedding table in one call (:func:`ell_rows`: a lookup of a few
tokens is bound by its op count).

The library is built once per machine and source (``cc -O3 -march=native -shared``; ``$CC`` if set) into
``$DC_LIGHTNING_CACHE_DIR`` (default ``~/.cache/dc_lightning/native``; the file name hashes the source, the compiler
and the CPU, so a home directory shared between machines never loads another CPU's build), written atomically, and
checked against the PyTorch lookups it replaces before it is used (loading it runs its code: keep the cache folder
writable by you alone, as ``~/.cache`` is). Without a compiler, if the build or that check fails, or with
``DC_LIGHTNING_NATIVE=0``, :func:`available` is False, :func:`status` says why (logged once at INFO), and the
references keep their PyTorch ops: same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "usable", "is_real", "available", "status", "library", "decode", "decode_segments", "decode_tc_rows",
    "decode_lut_rows", "ell_rows", "sparse_product", "ENV", "CACHE_ENV",
]  # fmt: skip

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
#: ``DC_LIGHTNING_NATIVE=0`` (or ``false`` / ``no`` / ``off``) turns the native decode off (nothing is compiled or
#: loaded)
ENV = "DC_LIGHTNING_NATIVE"
#: where the compiled library is kept (default ``$XDG_CACHE_HOME`` or ``~/.cache``, then ``dc_lightning/native``)
CACHE_ENV = "DC_LIGHTNING_CACHE_DIR"
_FLAGS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler does not know -march=native

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None; "why": what status() says


def usable(*tensors: Tensor) -> bool:
    """Whether a decode of these tensors may run natively: real CPU tensors outside a trace (:func:`is_real`) and the
    library available."""
    return is_real(*tensors) and all(t.is_cpu for t in tensors) and available()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_real(*tensors: Tensor) -> bool:
    """Whether these tensors hold data, outside a trace: only then may a native call or a cached constant tensor meet
    them (a fake tensor of ``torch.compile`` or ``triton_op`` tracing has no data and cannot meet a real one). Plain
    tensors and parameters are checked by their type alone (a per-call cost of ~0.1 µs instead of ~1 µs)."""
    if torch.compiler.is_compiling():
        return False
    return all(not t.is_meta if type(t) in _PLAIN else not is_fake(t) and not t.is_meta for t in tensors)


def available() -> bool:
    """Whether the native decode is built, checked and on (builds it on the first call)."""
    return _library() is not None


def status() -> str:
    """One line: the library in use and its vector width, or why PyTorch ops are used instead."""
    if _off():
        return f"off ({ENV}=0)"
    _library()
    return str(_state.get("why", "not built"))


def library() -> ctypes.CDLL | None:
    """The loaded library (``None`` when unavailable) for hot loops that have checked their arguments once: the C
    functions behind :func:`decode_segments`, :func:`decode_tc_rows` and :func:`decode_lut_rows`
    (``dc_decode_segments``, ``dc_decode_tc_rows``, ``dc_decode_lut_rows``; pointers and counts, no bounds checks).
    The row lookup and the sparse product check their entries in C and take ``checked=False`` instead."""
    return _library()


def decode(src: Tensor, table: Tensor, out: Tensor | None = None) -> Tensor:
    """float32 ``[..., 2 * n]``: each byte's low-nibble and high-nibble value of ``table``, side by side.

    Args:
        src: uint8 ``[..., n]``, contiguous, on the CPU.
        table: float32 ``[16]`` on the CPU.
        out: optional float32 contiguous tensor of ``2 * src.numel()`` elements to write (returned, viewed).

    Raises:
        RuntimeError: the native decode is not available (check :func:`available` first).
        ValueError: a tensor of the wrong dtype, device, layout or size (the message names it).
    """
    _check_src(src)
    shape = (*src.shape[:-1], 2 * src.shape[-1]) if src.dim() else (2,)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    decode_segments(src.view(-1), 0, 1, src.numel(), src.numel(), table, out.view(-1))
    return out.view(shape)


def decode_segments(src: Tensor, offset: int, nseg: int, seg: int, stride: int, table: Tensor, out: Tensor) -> None:
    """Decode ``nseg`` runs of ``seg`` bytes of ``src`` (run ``s`` starts at element ``offset + s * stride``) one
    after another into ``out`` (``2 * seg`` floats per run), as :func:`decode` does.

    Raises:
        RuntimeError: the native decode is not available.
        ValueError: a tensor of the wrong dtype, device or layout, or a run outside ``src`` or ``out``.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native decode unavailable: {status()}")
    _check_src(src)
    _check_table(table)
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor, got {out.dtype} on {out.device}")
    if min(offset, nseg, seg, stride) < 0:
        raise ValueError(f"offset, nseg, seg and stride must be >= 0, got {offset}, {nseg}, {seg}, {stride}")
    if nseg == 0 or seg == 0:
        return
    if offset + (nseg - 1) * stride + seg > src.numel():
        raise ValueError(
            f"runs of {seg} bytes at {offset} + s * {stride} for s < {nseg} end past src's {src.numel()} bytes"
        )
    if out.numel() < 2 * nseg * seg:
        raise ValueError(f"out holds {out.numel()} floats, the runs decode to {2 * nseg * seg}")
    lib.dc_decode_segments(src.data_ptr() + offset, nseg, seg, stride, table.data_ptr(), out.data_ptr())


def decode_tc_rows(codes: Tensor, row0: int, nrows: int, table: Tensor, out: Tensor | None = None) -> Tensor:
    """Rows ``[row0, row0 + nrows)`` of a ``tc`` layer (:mod:`~dc_lightning.kernels.tc.layout`) decoded in row order:
    float32 ``[nrows, k_tiles * 256]`` (padded columns included).

    Args:
        codes: the layer's int16 ``[rows_padded, k_tiles * 64]`` words, contiguous, on the CPU.
        table: float32 ``[16]``, the layer's codebook.
        out: optional float32 contiguous tensor of at least ``nrows * k_tiles * 256`` elements (returned, viewed).

    Raises:
        RuntimeError: the native decode is not available.
        ValueError: a tensor of the wrong dtype, device, layout or size, or rows outside ``codes``.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native decode unavailable: {status()}")
    if codes.dtype != torch.int16 or codes.dim() != 2 or codes.device.type != "cpu" or not codes.is_contiguous():
        raise ValueError(f"codes must be a contiguous int16 [rows_padded, k_tiles*64] CPU tensor, got {codes.dtype} "
                         f"{tuple(codes.shape)} on {codes.device}")  # fmt: skip
    if codes.shape[0] % 16 or codes.shape[1] % 64:
        raise ValueError(f"codes' shape must be multiples of [16, 64], got {tuple(codes.shape)}")
    _check_table(table)
    if row0 < 0 or nrows < 0 or row0 + nrows > codes.shape[0]:
        raise ValueError(f"rows [{row0}, {row0 + nrows}) are outside the layer's {codes.shape[0]} padded rows")
    cols = codes.shape[1] * 4
    if out is None:
        out = torch.empty(nrows * cols, dtype=torch.float32)
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < nrows * cols:
        raise ValueError(f"out must be a contiguous float32 CPU tensor of >= {nrows * cols} values, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    lib.dc_decode_tc_rows(codes.data_ptr(), row0, nrows, codes.shape[1] // 64, table.data_ptr(), out.data_ptr())
    return out.view(-1)[: nrows * cols].view(nrows, cols)


def decode_lut_rows(
    codes: Tensor, mask: Tensor | None, row0: int, nrows: int, cbits: int, table: Tensor, out: Tensor | None = None
) -> Tensor:
    """Rows ``[row0, row0 + nrows)`` of a ``lut`` layer of 2- or 4-bit codes (:mod:`~dc_lightning.kernels.lut.layout`)
    in column order: float32 ``[nrows, n_groups * 32 * (32 // cbits)]`` (padded columns included); a position the
    bitmap prunes decodes as ``table[code] * 0.0``, as the PyTorch decode.

    Args:
        codes: the layer's int32 ``[rows, n_groups * 32]`` words, contiguous, on the CPU.
        mask: its int32 ``[rows, n_groups * 32 // cbits]`` bitmap, or ``None``.
        cbits: 2 or 4.
        table: float32 ``[16]``: the codebook padded with zeros.
        out: optional float32 contiguous tensor of at least ``nrows`` rows of output (returned, viewed).

    Raises:
        RuntimeError: the native decode is not available.
        ValueError: a tensor of the wrong dtype, device, layout or size, rows outside ``codes``, or ``cbits``.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native decode unavailable: {status()}")
    if cbits not in (2, 4):
        raise ValueError(f"cbits must be 2 or 4 for the native decode, got {cbits}")
    if codes.dtype != torch.int32 or codes.dim() != 2 or codes.device.type != "cpu" or not codes.is_contiguous():
        raise ValueError(f"codes must be a contiguous int32 [rows, n_groups*32] CPU tensor, got {codes.dtype} "
                         f"{tuple(codes.shape)} on {codes.device}")  # fmt: skip
    if codes.shape[1] % 32:
        raise ValueError(f"codes' width must be a multiple of 32 words, got {tuple(codes.shape)}")
    groups, pw = codes.shape[1] // 32, 32 // cbits
    if mask is not None and (
        mask.dtype != torch.int32 or mask.device.type != "cpu" or not mask.is_contiguous()
        or tuple(mask.shape) != (codes.shape[0], groups * pw)
    ):  # fmt: skip
        raise ValueError(f"mask must be a contiguous int32 [{codes.shape[0]}, {groups * pw}] CPU tensor or None, got "
                         f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")  # fmt: skip
    _check_table(table)
    if row0 < 0 or nrows < 0 or row0 + nrows > codes.shape[0]:
        raise ValueError(f"rows [{row0}, {row0 + nrows}) are outside the layer's {codes.shape[0]} rows")
    cols = groups * 32 * pw
    if out is None:
        out = torch.empty(nrows * cols, dtype=torch.float32)
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < nrows * cols:
        raise ValueError(f"out must be a contiguous float32 CPU tensor of >= {nrows * cols} values, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    lib.dc_decode_lut_rows(codes.data_ptr(), 0 if mask is None else mask.data_ptr(), row0, nrows, groups, cbits,
                           table.data_ptr(), out.data_ptr())  # fmt: skip
    return out.view(-1)[: nrows * cols].view(nrows, cols)


_ENTRY_SIZES = {torch.uint8: 1, torch.int16: 2, torch.int32: 4}


def ell_rows(entries: Tensor, codebook: Tensor, idx: Tensor, cols: int, *, checked: bool = True) -> Tensor:
    """The rows ``idx`` of an ``ell`` row table (:mod:`~dc_lightning.kernels.rows.layout`) as float32 ``[len(idx),
    cols]``, in one call: zeros, then each kept entry's codebook value at its column.

    Args:
        entries: uint8, int16 or int32 ``[2, rows, L]`` (columns, codes), contiguous, on the CPU.
        codebook: float32 ``[n]`` on the CPU (the padding's zero last).
        idx: int64 1-D row indices (contiguous when ``checked=False``).
        checked: validate the tensors first; ``False`` for a caller that has (a lookup of a few tokens is bound by
            its per-call cost).

    Raises:
        RuntimeError: the native decode is not available.
        IndexError: an index outside ``[0, rows)`` (named, as ``nn.Embedding`` would refuse it).
        ValueError: a tensor of the wrong dtype, device or layout, or a row whose entries fall outside the table.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native decode unavailable: {status()}")
    if not checked:
        return _ell_rows(lib, entries, _ENTRY_SIZES[entries.dtype], codebook, idx, cols)
    sizes = _ENTRY_SIZES
    if entries.dtype not in sizes or entries.dim() != 3 or entries.shape[0] != 2 or not entries.is_contiguous():
        raise ValueError(f"entries must be a contiguous uint8/int16/int32 [2, rows, L] tensor, got {entries.dtype} "
                         f"{tuple(entries.shape)}")  # fmt: skip
    if codebook.dtype != torch.float32 or codebook.dim() != 1 or not codebook.is_contiguous():
        raise ValueError(
            f"codebook must be a contiguous float32 [n] tensor, got {codebook.dtype} {tuple(codebook.shape)}"
        )
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"idx must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    if any(t.device.type != "cpu" for t in (entries, codebook, idx)):
        raise ValueError("entries, codebook and idx must be on the CPU")
    return _ell_rows(lib, entries, sizes[entries.dtype], codebook, idx.contiguous(), cols)


def _ell_rows(lib: ctypes.CDLL, entries: Tensor, esize: int, codebook: Tensor, idx: Tensor, cols: int) -> Tensor:
    """:func:`ell_rows` for checked arguments (a lookup of a few tokens is bound by its per-call cost)."""
    out = torch.empty(idx.numel(), cols, dtype=torch.float32)
    v = entries.shape[1]
    bad = lib.dc_ell_rows(entries.data_ptr(), esize, v, entries.shape[2], idx.data_ptr(), idx.numel(),
                          codebook.data_ptr(), codebook.numel(), cols, out.data_ptr())  # fmt: skip
    if bad >= 0:
        raise IndexError(f"index {int(idx[bad])} is out of range for a table of {v} rows (valid: 0..{v - 1})")
    if bad < -1:
        row = int(idx[-2 - bad])
        raise ValueError(f"row {row} of the table holds an entry outside its {cols} columns x {codebook.numel()} "
                         f"codebook values (a damaged table)")  # fmt: skip
    return out


def sparse_product(
    x: Tensor, entries: Tensor, block_ptr: Tensor, n_chunks: int, row_tile: int, chunk: int, code_shift: int,
    codebook: Tensor, out_features: int, *, checked: bool = True,
) -> Tensor:  # fmt: skip
    """``x @ W.T``, float32 ``[B, out_features]``, straight from the ``sparse`` layout's sliced-ELL entries
    (:mod:`~dc_lightning.kernels.sparse.layout`), in one call: each entry adds ``x[:, column] * codebook[code]`` to
    its row. Not differentiable (the caller keeps the PyTorch product for inputs that require a gradient).

    Args:
        x: float32 ``[B, in_features]``, contiguous, on the CPU.
        entries: int16 or int32 ``[n_entries]`` words ``(local column << code_shift) | code``.
        block_ptr: int32 ``[n_tiles * n_chunks + 1]``.
        checked: validate the tensors first (``False``: the caller has; entries are still bounds-checked).

    Raises:
        RuntimeError: the native decode is not available.
        ValueError: a tensor of the wrong dtype, device or layout, or an entry outside the matrix or codebook.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native decode unavailable: {status()}")
    if not checked:
        return _sparse_product(
            lib, x, entries, block_ptr, n_chunks, row_tile, chunk, code_shift, codebook, out_features
        )
    if entries.dtype not in (torch.int16, torch.int32) or not entries.is_contiguous():
        raise ValueError(f"entries must be a contiguous int16/int32 tensor, got {entries.dtype}")
    if block_ptr.dtype != torch.int32 or not block_ptr.is_contiguous() or block_ptr.numel() < 1:
        raise ValueError(f"block_ptr must be a contiguous int32 tensor, got {block_ptr.dtype} {tuple(block_ptr.shape)}")
    if (block_ptr.numel() - 1) % max(n_chunks, 1):
        raise ValueError(f"block_ptr holds {block_ptr.numel() - 1} blocks, not a multiple of n_chunks={n_chunks}")
    if codebook.dtype != torch.float32 or codebook.dim() != 1 or not codebook.is_contiguous():
        raise ValueError(
            f"codebook must be a contiguous float32 [n] tensor, got {codebook.dtype} {tuple(codebook.shape)}"
        )
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 [B, in_features] tensor, got {x.dtype} {tuple(x.shape)}")
    if any(t.device.type != "cpu" for t in (x, entries, block_ptr, codebook)):
        raise ValueError("x, entries, block_ptr and codebook must be on the CPU")
    if block_ptr.numel() > 1 and (int(block_ptr[0]) < 0 or int(block_ptr[-1]) > entries.numel()):
        raise ValueError(f"block_ptr spans entries [{int(block_ptr[0])}, {int(block_ptr[-1])}), the layer holds "
                         f"{entries.numel()}")  # fmt: skip
    return _sparse_product(lib, x, entries, block_ptr, n_chunks, row_tile, chunk, code_shift, codebook, out_features)


def _sparse_product(
    lib: ctypes.CDLL, x: Tensor, entries: Tensor, block_ptr: Tensor, n_chunks: int, row_tile: int, chunk: int,
    code_shift: int, codebook: Tensor, out_features: int,
) -> Tensor:  # fmt: skip
    """:func:`sparse_product` for checked arguments."""
    xt = x.t().contiguous() if x.shape[0] > 1 else x  # [K, B]: an entry reads one contiguous run of x
    yt = torch.empty(out_features, x.shape[0], dtype=torch.float32)
    n_tiles = (block_ptr.numel() - 1) // max(n_chunks, 1)
    bad = lib.dc_sparse_product(entries.data_ptr(), entries.element_size(), block_ptr.data_ptr(), n_tiles, n_chunks,
                                row_tile, chunk, code_shift, codebook.data_ptr(), codebook.numel(), xt.data_ptr(),
                                x.shape[0], x.shape[1], yt.data_ptr(), out_features)  # fmt: skip
    if bad >= 0:
        raise ValueError(f"entry {bad} of the sparse layer points outside its {x.shape[1]} columns x "
                         f"{codebook.numel()} codebook values (a damaged layer)")  # fmt: skip
    return yt.t() if x.shape[0] > 1 else yt.view(1, out_features)


def _check_table(table: Tensor) -> None:
    if table.dtype != torch.float32 or table.device.type != "cpu" or table.numel() != 16 or not table.is_contiguous():
        raise ValueError(
            f"table must be a contiguous float32 CPU tensor of 16 values, got {table.dtype} "
            f"{tuple(table.shape)} on {table.device}"
        )


def _check_src(src: Tensor) -> None:
    if src.dtype != torch.uint8 or src.device.type != "cpu" or not src.is_contiguous():
        raise ValueError(f"src must be a contiguous uint8 CPU tensor, got {src.dtype} on {src.device}")


# --------------------------------------------------------------------------------------------------------------
# build, cache, load, check
# --------------------------------------------------------------------------------------------------------------


def _off() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def _library() -> ctypes.CDLL | None:
    if _off():  # read per call (a test or a benchmark may switch it); the built library stays loaded
        return None
    with _lock:
        if "lib" not in _state:
            lib, why = _build_and_load()
            _state.update(lib=lib, why=why)
            log.info("dc_lightning native CPU decode: %s", why)
        return _state["lib"]  # type: ignore[return-value]


def _reset() -> None:
    """Forget the loaded library (tests: the next call builds or loads again)."""
    with _lock:
        _state.clear()


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        parts = shlex.split(cc)
        return parts if parts and shutil.which(parts[0]) else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cpu_id() -> str:
    """What a build with -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.processor()} {platform.machine()}"


def _cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dc_lightning" / "native"


def _build_and_load() -> tuple[ctypes.CDLL | None, str]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (install cc or set CC); the CPU references gather with PyTorch ops"
    try:
        source = SOURCE.read_bytes()
    except OSError as err:
        return None, f"cannot read {SOURCE}: {err}"
    key = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), repr(_FLAGS).encode(), platform.machine().encode(),
                                     _cpu_id().encode()])).hexdigest()[:20]  # fmt: skip
    target = _cache_dir() / f"cpu_decode-{key}.so"
    built = not target.exists()
    if built:
        why = _build(cc, target)
        if why:
            return None, why
    lib, why = _load(target)
    if lib is None and not built:  # a cached file that does not load or check: build it once more
        target.unlink(missing_ok=True)
        why = _build(cc, target)
        if why:
            return None, why
        lib, why = _load(target)
    return lib, why


def _build(cc: list[str], target: Path) -> str:
    """Compile SOURCE into ``target`` (atomically); '' or why it failed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the cache folder {target.parent}: {err} (set {CACHE_ENV})"
    errors = []
    for flags in _FLAGS:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".cpu_decode-", suffix=".so", dir=target.parent)
        except OSError as err:
            return f"cannot write in the cache folder {target.parent}: {err} (set {CACHE_ENV})"
        os.close(fd)
        try:
            run = subprocess.run([*cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            if run.returncode == 0:
                os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
                return ""
            last = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
            errors.append(f"{' '.join(flags)}: {last[0]}")
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    why = "; ".join(errors)
    return f"building {SOURCE.name} with {cc[0]} failed ({why}); the CPU references gather with PyTorch ops"


def _load(target: Path) -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(target))
        for name in ("dc_decode_segments", "dc_decode_tc_rows"):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                           ctypes.c_void_p]  # fmt: skip
            fn.restype = None
        lut = lib.dc_decode_lut_rows
        lut.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        lut.restype = None
        ell = lib.dc_ell_rows
        ell.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
        ell.restype = ctypes.c_int64
        sp = lib.dc_sparse_product
        sp.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int64]  # fmt: skip
        sp.restype = ctypes.c_int64
        lib.dc_decode_width.restype = ctypes.c_int
        width = int(lib.dc_decode_width())
    except (OSError, AttributeError) as err:
        return None, f"cannot load {target}: {err}; the CPU references gather with PyTorch ops"
    why = _self_check(lib)
    if why:
        return None, f"{target} failed its check ({why}); the CPU references gather with PyTorch ops"
    kind = {512: "AVX-512", 256: "AVX2"}.get(width, "scalar")
    return lib, f"{kind} build {target}"


def _self_check(lib: ctypes.CDLL) -> str:
    """Decode every byte value, with a tail shorter than one vector, and compare with the table lookup."""
    src = torch.cat([torch.arange(256, dtype=torch.uint8), torch.arange(37, dtype=torch.uint8) * 7])
    table = torch.randn(16, dtype=torch.float32)
    out = torch.full((2 * src.numel(),), float("nan"), dtype=torch.float32)
    lib.dc_decode_segments(src.data_ptr(), 1, src.numel(), src.numel(), table.data_ptr(), out.data_ptr())
    codes = torch.stack([src & 15, src >> 4], 1).reshape(-1).long()
    expected = table[codes]
    if not torch.equal(out, expected):
        bad = int((out != expected).nonzero()[0])
        return f"byte decode, value {bad}: {float(out[bad])} instead of {float(expected[bad])}"
    # tc rows: two tiles of 32 rows; the words' bytes (G, qhi, rho, t, kappa, qlo, b) in row order (G, b, rho), columns
    # (t, qhi, qlo, kappa), two codes per byte (the permutation of tc/layout.py's _bytes_in_row_order)
    words = torch.randint(-(1 << 15), 1 << 15, (32, 128), dtype=torch.int16)
    b = words.view(torch.uint8).view(2, 2, 8, 2, 32, 2, 2).permute(0, 6, 2, 3, 1, 5, 4).reshape(32, 256)
    expected = table[torch.stack([b & 15, b >> 4], -1).reshape(32, 512).long()]
    out = torch.full((32, 512), float("nan"), dtype=torch.float32)
    lib.dc_decode_tc_rows(words.data_ptr(), 0, 32, 2, table.data_ptr(), out.data_ptr())
    if not torch.equal(out, expected):
        bad = tuple(int(v) for v in (out != expected).nonzero()[0])
        return f"tc rows, position {bad}: {float(out[bad])} instead of {float(expected[bad])}"
    # lut rows: two groups of 4-bit and of 2-bit codes, with a bitmap (word j holds column 32 s + j of its group at
    # bits [s * cbits, (s + 1) * cbits); mask bit c % 32 of word c // 32 keeps column c; pruned: table[code] * 0.0)
    for cbits in (4, 2):
        pw = 32 // cbits
        words = torch.randint(-(1 << 31), 1 << 31, (3, 64), dtype=torch.int64).to(torch.int32)
        mask = torch.randint(-(1 << 31), 1 << 31, (3, 2 * pw), dtype=torch.int64).to(torch.int32)
        shifts = torch.arange(pw, dtype=torch.int32).view(-1, 1) * cbits
        codes = (words.view(3, 2, 1, 32) >> shifts) & ((1 << cbits) - 1)  # [rows, g, s, j]
        kept = (mask.view(3, 2 * pw, 1) >> torch.arange(32, dtype=torch.int32)) & 1
        expected = table[codes.reshape(3, -1).long()] * kept.reshape(3, -1)
        out = torch.full((3, 64 * pw), float("nan"), dtype=torch.float32)
        lib.dc_decode_lut_rows(words.data_ptr(), mask.data_ptr(), 0, 3, 2, cbits, table.data_ptr(), out.data_ptr())
        if not torch.equal(out, expected) or not torch.equal(out.signbit(), expected.signbit()):
            bad = tuple(int(v) for v in ((out != expected) | (out.signbit() != expected.signbit())).nonzero()[0])
            return f"lut rows ({cbits} bits), position {bad}: {float(out[bad])} instead of {float(expected[bad])}"
    # ell rows: 5 rows of 3 entries each (columns < 40, codes < 16), looked up in another order and twice
    for dtype, esize in ((torch.uint8, 1), (torch.int16, 2), (torch.int32, 4)):
        entries = torch.stack([torch.randint(0, 40, (5, 3)), torch.randint(0, 16, (5, 3))]).to(dtype).contiguous()
        idx = torch.tensor([4, 0, 2, 4], dtype=torch.int64)
        expected = torch.zeros(4, 40)
        for i, r in enumerate(idx.tolist()):
            for j in range(3):
                expected[i, int(entries[0, r, j])] = table[int(entries[1, r, j])]
        out = torch.full((4, 40), float("nan"))
        rc = lib.dc_ell_rows(entries.data_ptr(), esize, 5, 3, idx.data_ptr(), 4, table.data_ptr(), 16, 40,
                             out.data_ptr())  # fmt: skip
        if rc != -1 or not torch.equal(out, expected):
            return f"ell rows ({dtype}): return code {rc}, or values differ"
    # sparse product: one tile of 4 lanes (3 real rows), two chunks of 8 columns, 2 + 1 ELL steps, 4-bit codes and the
    # padding slot 16 (0.0), two rows of x; compared in float64 (the sums' order is free)
    for dtype in (torch.int16, torch.int32):
        cols, codes = torch.randint(0, 8, (12,)), torch.randint(0, 17, (12,))
        entries = ((cols << 5) | codes).to(dtype)
        block_ptr = torch.tensor([0, 8, 12], dtype=torch.int32)
        cb = torch.cat([table, torch.zeros(1)])
        x = torch.randn(2, 16)
        expected = torch.zeros(2, 4, dtype=torch.float64)
        for e in range(12):
            c = int(cols[e]) + (8 if e >= 8 else 0)
            expected[:, e % 4] += x[:, c].double() * float(cb[int(codes[e])])
        xt, y = x.t().contiguous(), torch.full((3, 2), float("nan"))
        rc = lib.dc_sparse_product(entries.data_ptr(), entries.element_size(), block_ptr.data_ptr(), 1, 2, 4, 8, 5,
                                   cb.data_ptr(), 17, xt.data_ptr(), 2, 16, y.data_ptr(), 3)  # fmt: skip
        if rc != -1 or not torch.allclose(y.t().double(), expected[:, :3], rtol=1e-5, atol=1e-5):
            return f"sparse product ({dtype}): return code {rc}, or values differ"
    return ""

"""Small shared helpers: atomic file writes, one `instantiate` for Hydra configs, layer selection."""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from torch import nn

#: module types whose ``weight`` the compression callbacks target by default
DEFAULT_TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` atomically: a temporary file in the same folder, fsync, then rename over the target.

    A crash mid-write leaves any previous file at ``path`` intact and no partial file under its name.

    Example::

        with atomic_write("model.dcz") as f:
            f.write(payload)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def select_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
    what: str = "layer selection",
) -> dict[str, nn.Module]:
    """Pick the layers to compress: modules of ``types`` with a ``weight``, filtered by fnmatch patterns.

    Names are those of ``model.named_modules()``. Every ``include``/``exclude`` pattern must match at least
    one candidate layer, so that a typo is an error instead of a silently uncompressed layer.

    Raises:
        ValueError: a pattern matches no candidate layer (the message lists the available names).
    """
    candidates = {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(m, types) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }
    if not candidates:
        raise ValueError(
            f"{what}: the model has no layer of type {[t.__name__ for t in types]} with a weight parameter"
        )
    include = list(include) if include is not None else None
    exclude = list(exclude or [])
    for kind, patterns in (("include", include or []), ("exclude", exclude)):
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(n, pat) for n in candidates):
                raise ValueError(
                    f"{what}: {kind} pattern {pat!r} matches no layer; available layers: {sorted(candidates)}"
                )
    chosen = {}
    for name, m in candidates.items():
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen[name] = m
    return chosen


def resolve_per_layer(
    value: Any, names: Iterable[str], field: str, default: Any = None
) -> dict[str, Any]:
    """Expand a scalar or a ``{pattern: value}`` dict into ``{layer: value}``.

    With a dict, the *last* matching pattern wins (so specific patterns go after general ones); layers no
    pattern matches get ``default``, or raise when ``default`` is None. Every pattern must match a layer.

    Raises:
        ValueError: a pattern matches none of ``names``, or a layer is left without a value.
    """
    names = list(names)
    if not isinstance(value, dict):
        return {n: value for n in names}
    out: dict[str, Any] = {}
    for pat, v in value.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, str(pat))]
        if not hits:
            raise ValueError(f"{field}: pattern {pat!r} matches no target layer; target layers: {names}")
        for n in hits:
            out[n] = v
    for n in names:
        if n not in out:
            if default is None:
                raise ValueError(
                    f"{field}: no pattern gives a value for layer {n!r}; add it (or a '*' pattern) to {field}"
                )
            out[n] = default
    return out


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """The one route from a Hydra config node to an object (``hydra.utils.instantiate`` underneath).

    The object gets plain ``dict``/``list`` arguments, never OmegaConf nodes (``_convert_="all"`` unless the node or
    a keyword says otherwise), so that it checks, stores and checkpoints them as it would Python values.
    """
    from hydra.utils import instantiate as _instantiate

    if "_convert_" not in kwargs and not (hasattr(cfg, "get") and cfg.get("_convert_") is not None):
        kwargs["_convert_"] = "all"
    return _instantiate(cfg, **kwargs)


def console(stderr: bool = False):
    """A rich Console for tables: the terminal's width, or 160 columns when output is not a terminal (logs, CI),
    where rich would otherwise truncate the paper's wide per-layer tables to 80 columns."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=160)

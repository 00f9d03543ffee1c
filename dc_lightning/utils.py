"""Small shared helpers: atomic file writes, one `instantiate` for Hydra configs, target names, per-layer values."""

from __future__ import annotations

import fnmatch
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


def is_number(v: Any) -> bool:
    """A real number, not a bool (``True`` is an ``int`` to Python, never a density or a rate to us)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def target_name(module_name: str, param: str) -> str:
    """The name of a compression target (docs/DESIGN.md, :mod:`dc_lightning.targets`): ``module_name`` for the
    parameter ``weight`` (``""`` for the root module's, as in ``named_modules()``), else ``<module_name>.<param>``
    (``param`` alone for the root module)."""
    if param == "weight":
        return module_name
    return f"{module_name}.{param}" if module_name else param


def resolve_per_layer(
    value: Any,
    names: Iterable[str],
    field: str,
    default: Any = None,
    aliases: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """Expand a scalar or a ``{pattern: value}`` dict into ``{layer: value}``.

    With a dict, the *last* matching pattern wins (so specific patterns go after general ones); layers no
    pattern matches get ``default``, or raise when ``default`` is None. Every pattern must match a layer. A pattern
    matches a layer's name or, with ``aliases`` (``{name: names}``, e.g. ``dc_lightning.targets.pattern_aliases``),
    any of the names listed for it. When ``aliases`` has an ``unmatched_hint(pattern) -> str`` method (those of
    ``pattern_aliases`` over ``select_targets``' result do), the error for a pattern that matches nothing ends with
    its text (the modules it matches whose type is not targeted, tied weights).

    Raises:
        ValueError: a pattern matches none of ``names``, or a layer is left without a value.
    """
    names = list(names)
    if not isinstance(value, dict):
        return {n: value for n in names}
    out: dict[str, Any] = {}
    for pat, v in value.items():
        hits = [n for n in names if any(fnmatch.fnmatchcase(a, str(pat)) for a in (aliases or {}).get(n, (n,)))]
        if not hits:
            why = getattr(aliases, "unmatched_hint", None)
            hint = why(str(pat)) if callable(why) else ""
            raise ValueError(
                f"{field}: pattern {pat!r} matches no target layer; target layers: {names}"
                + (f"; {hint}" if hint else "")
            )
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

"""The ``.dcz`` compressed file format: one versioned safetensors file, no pickle (Deep Compression §2-§4).

* :mod:`dc_lightning.dcz.container`: the file's identity (format name, version, scan order), payloads, sections,
  checksums and the checks readers run before decoding; :class:`CorruptFileError`.
* :mod:`dc_lightning.dcz.codec`: what a layer's payload holds (relative-index and codebook-index streams, codebook
  or kept values): :func:`build_file` encodes a model, :func:`read_compressed` decodes a file into
  :class:`CompressedFile` / :class:`CompressedLayer`.

Saving to and loading into a model (the builder record, buffers re-attached) is :mod:`dc_lightning.io`.

Example::

    from dc_lightning.dcz import read_compressed

    f = read_compressed("vgg16.dcz")
    layer = f.layers["classifier.0"]   # rows, cols, codes, codebook
"""

from dc_lightning.dcz.codec import (
    AUTO,
    AUTO_INDEX_BITS,
    MAX_DENSE_EXPANSION,
    PAPER_INDEX_BITS,
    CompressedFile,
    CompressedLayer,
    build_file,
    builder_record,
    read_compressed,
)
from dc_lightning.dcz.container import (
    EXTENSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    SCAN_ORDER,
    CorruptFileError,
    read_header,
    read_stream,
)

__all__ = [
    "AUTO",
    "AUTO_INDEX_BITS",
    "EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_DENSE_EXPANSION",
    "PAPER_INDEX_BITS",
    "SCAN_ORDER",
    "CompressedFile",
    "CompressedLayer",
    "CorruptFileError",
    "build_file",
    "builder_record",
    "read_compressed",
    "read_header",
    "read_stream",
]

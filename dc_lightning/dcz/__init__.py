"""The ``.dcz`` compressed file format: one versioned safetensors file, no pickle (Deep Compression §2-§4).

* :mod:`dc_lightning.dcz.container`: the file's identity (format name, version, scan order), payloads, sections,
  checksums and the checks readers run before decoding; :class:`CorruptFileError`.
* :mod:`dc_lightning.dcz.encode`: what a layer's payload holds (relative-index and codebook-index streams, codebook
  or kept values): :func:`build_file` encodes a model;
* :mod:`dc_lightning.dcz.decode`: :func:`read_compressed` validates every record, then decodes a file into the
  decoded view of :mod:`dc_lightning.dcz.records` (:class:`CompressedFile` / :class:`CompressedLayer`);
* :mod:`dc_lightning.dcz.huffman` and :mod:`dc_lightning.dcz.relative_index`: the two codings of the streams.

Saving to and loading into a model (the builder record, buffers re-attached) is :mod:`dc_lightning.io`.

Example::

    from dc_lightning.dcz import read_compressed

    f = read_compressed("vgg16.dcz")
    layer = f.layers["classifier.0"]   # rows, cols, codes, codebook
"""

from dc_lightning.dcz.container import (
    EXTENSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    SCAN_ORDER,
    CorruptFileError,
    read_header,
    read_stream,
)
from dc_lightning.dcz.decode import read_compressed
from dc_lightning.dcz.encode import AUTO, AUTO_INDEX_BITS, build_file, builder_record
from dc_lightning.dcz.records import MAX_DENSE_EXPANSION, CompressedFile, CompressedLayer

__all__ = [
    "AUTO",
    "AUTO_INDEX_BITS",
    "EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_DENSE_EXPANSION",
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

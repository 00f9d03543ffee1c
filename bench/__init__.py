"""Benchmarks and experiments of dc_lightning (not shipped with the package).

Run every script as a module from the repository root, with the package importable (installed, or the checkout on
``PYTHONPATH``)::

    python -m bench.kernels.bench_eie_layouts --help

``harness/`` is the shared timing harness and the table/CSV/JSON writers; ``kernels/`` the kernel micro-benchmarks,
``training/`` the cost of compression during training, ``storage/`` the file format's tools and size studies,
``experiments/`` one-off accuracy experiments, ``gpu/`` the shell scripts of the lent GPU sessions. Results go to
``bench/results/<date>/`` and are described in ``bench/RESULTS.md``.
"""

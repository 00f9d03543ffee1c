"""What every bench script shares: timing (:mod:`bench.harness.timing`), tables and result files
(:mod:`bench.harness.report`), EIE's benchmark layers and the int4 peer (:mod:`bench.harness.eie`)."""

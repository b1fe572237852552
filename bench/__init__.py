"""Benchmarks for Clipper: the echo floor, a load generator and the runner.

- ``bench.echo_server``: the bare floor, a minimal uvloop msgpack server.
- ``bench.loadgen``: closed- and open-loop load over the msgpack port.
- ``bench.run``: runs the scenarios and writes one JSON report.

See ``bench/README.md``.
"""

"""vrpc's benchmark suite: the hot I/O path against its peers (``python -m benchmarks``).

Each system under test is a module exposing ``serve(path, stop)`` and ``open_client(path)``
(see :mod:`benchmarks._base`); :mod:`benchmarks.__main__` runs every server and its client in
separate processes over a Unix socket and writes JSON, a plot and a Markdown table.
"""

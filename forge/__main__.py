"""``python -m forge``: the ``forge`` program, for environments without the console
script on PATH (the benchmarks start servers and workers this way)."""

from forge.cli.main import entrypoint

entrypoint()

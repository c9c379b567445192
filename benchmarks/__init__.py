"""Side-by-side measurements: one experiment per script (see README.md), sharing
:mod:`benchmarks.harness`. Run a script as ``python benchmarks/x.py`` or ``python -m benchmarks.x``
from the repository root."""

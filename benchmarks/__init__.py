"""Reproducible performance measurements; see docs/performance.md.

`python -m benchmarks` runs the whole comparison; `python -m benchmarks.calls` counts NVML calls.
"""

import sys
from pathlib import Path

# The NVML stand-in's control module lives with the tests.
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

"""Benchmark-only interpreter hook, loaded when bench/hooks is on PYTHONPATH.

``python -m bench.run --set BENCH_SWITCH_INTERVAL=0.001`` puts this directory on
the gunicorn's PYTHONPATH so the GIL switch interval (default 5 ms) can be
measured without touching the service; it does nothing else. A setting found
worth keeping belongs in gunicorn.conf.py (a post_fork hook), not here.
"""

import os
import sys

_interval = os.environ.get("BENCH_SWITCH_INTERVAL")
if _interval:
    sys.setswitchinterval(float(_interval))

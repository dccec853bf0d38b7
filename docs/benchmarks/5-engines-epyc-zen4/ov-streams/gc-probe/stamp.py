"""Prefixes each line of stdin with the seconds since this script started."""

import sys
import time

t0 = time.time()
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:8.2f} {line}")
    sys.stdout.flush()

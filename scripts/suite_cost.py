"""The test suite's cost: its wall time, its CPU seconds (every process it starts, the warm CLI's commands
included) and the tests that cost the most CPU, to keep the suite inside its budget (6 minutes on 2 cores).

    python scripts/suite_cost.py [--top 30] [pytest arguments ...]

Runs `python -m pytest` with CNNLAB_TEST_CPU set (tests/conftest.py writes each test's CPU seconds) and prints
the totals and the most expensive tests and modules. Processes that a service starts (SLURM's jobs) are
not its children and are not counted.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=30)
    ns, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "cpu.tsv"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], cwd=REPO,
                              env={**os.environ, "CNNLAB_TEST_CPU": str(record)})
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [line.split("\t", 1) for line in record.read_text().splitlines()] if record.exists() else []
    tests = sorted(((float(s), name) for s, name in rows), reverse=True)
    modules = collections.Counter()
    for seconds, name in tests:
        modules[name.split("::", 1)[0]] += seconds
    print(f"\n{platform.node()}: {os.cpu_count()} cores, {platform.python_version()}")
    print(f"suite: exit {done.returncode}, wall {wall:.0f} s, CPU {usage.ru_utime + usage.ru_stime:.0f} s "
          f"(user {usage.ru_utime:.0f}, system {usage.ru_stime:.0f}); tests' own sum {sum(s for s, _ in tests):.0f} s, "
          f"{len(tests)} tests")
    print("\nmodules by CPU seconds:")
    for name, seconds in modules.most_common(ns.top):
        print(f"  {seconds:7.1f}  {name}")
    print("\ntests by CPU seconds:")
    for seconds, name in tests[:ns.top]:
        print(f"  {seconds:7.1f}  {name}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())

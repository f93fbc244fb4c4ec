"""Migration stress test with fault injection and failover: `llumigrate stress`.

    python benchmarks/stress_migration.py --requests 40 --seed 1 --json out/stress.json
"""

from __future__ import annotations

import argparse
import sys

from llumigrate.cli import stress

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=stress.__doc__)
    stress.add_arguments(parser)
    sys.exit(stress.run(parser.parse_args()))

"""The evidence table: PeRFlow students against the samplers a user would pick instead, on one teacher.

    python scripts/benchmark_evidence.py --teacher outputs/tiny-teacher/snapshot \
        --student B-sync=outputs/<run> --student B-fixed=outputs/<run> --out outputs/evidence

Writes <out>/results.json, <out>/table.md and <out>/sheets/*.png (docs/evidence.md); teacher samples are
cached in <out>/cache, so a rerun with new students samples only those. --quick: 3 prompts, 1 seed.
The command line is perflow_video.evaluation.evidence_cli.
"""

from __future__ import annotations

import sys

from perflow_video.errors import exit_status_of
from perflow_video.evaluation.evidence_cli import main

if __name__ == "__main__":
    sys.exit(exit_status_of(main, debug="--debug" in sys.argv))

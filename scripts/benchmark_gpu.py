"""Full-size AnimateDiff on one GPU: PeRFlow training-step time / memory by set-up, and seconds per clip of
PeRFlow 4 steps vs DDIM 25 steps (random weights from perflow_video/architectures; no download).

    python scripts/benchmark_gpu.py                 # one CUDA GPU, < 8 min; writes outputs/benchmark_gpu/
    python scripts/benchmark_gpu.py --smoke         # the same code on the CPU at tiny size (CI, < 1 min)

See docs/benchmark_gpu.md; the code is perflow_video.evaluation.benchmark_gpu.
"""

import sys

from perflow_video.evaluation.benchmark_gpu import main

if __name__ == "__main__":
    sys.exit(main())

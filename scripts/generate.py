"""Generate 4-step clips (AnimateDiff) or PNG images (SD1.5 / SD2.1 / SDXL) from a trained PeRFlow student
(or the embedded tiny default).

python scripts/generate.py --run outputs/<run> --prompt "a red circle moving left" --output clip.mp4
python scripts/generate.py --run outputs/tiny-sdxl --prompt "a red circle" --output circle.png
(--help lists every flag.)
"""

import sys

from perflow_video.generation.cli import main

if __name__ == "__main__":
    sys.exit(main())

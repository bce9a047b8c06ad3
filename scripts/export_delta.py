"""Write a PeRFlow ΔW in the files diffusers, ComfyUI and A1111 load (LoRAs, .diff patches, motion LoRAs).

python scripts/export_delta.py --run outputs/tiny-animatediff --out exported/ --rank 16
(--help lists every flag and format.)
"""

import sys

from perflow_video.weights.export_cli import main

if __name__ == "__main__":
    sys.exit(main())

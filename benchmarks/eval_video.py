"""Generated videos, Full-4D table 1: FVD (local I3D), CLIP-F and CLIP-V (local CLIP).

    python benchmarks/eval_video.py --fake runs/gen --real data/real --i3d i3d_torchscript.pt --clip clip/

The same as ``fourdgen eval video``; see fourdgen/evaluation/video.py.
"""

import sys

from fourdgen.evaluation.command import main

if __name__ == "__main__":
    main(["video", *sys.argv[1:]])

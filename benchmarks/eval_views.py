"""Novel views: N3DV's held-out cam00 (PSNR/SSIM/LPIPS) or DyCheck's masked mPSNR/mSSIM/mLPIPS.

    python benchmarks/eval_views.py n3dv --gt scenes/coffee --pred renders/cam00.mp4 --lpips_weights alex.pth
    python benchmarks/eval_views.py dycheck --gt data/iphone/apple --pred runs/apple/val --scale 2

The same as ``fourdgen eval n3dv|dycheck``; see fourdgen/evaluation/views.py.
"""

import sys

from fourdgen.evaluation.command import main

if __name__ == "__main__":
    main(sys.argv[1:])

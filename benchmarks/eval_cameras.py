"""Camera trajectories, One4D table 4 (ATE, RPE-T, RPE-R on Sintel and TUM-dynamics).

    python benchmarks/eval_cameras.py tum --gt data/tum --pred runs/tum_cams

The same as ``fourdgen eval cameras``; see fourdgen/evaluation/cameras.py for the protocol.
"""

import sys

from fourdgen.evaluation.command import main

if __name__ == "__main__":
    main(["cameras", *sys.argv[1:]])

"""Video depth, One4D table 3 (AbsRel, delta < 1.25 on Sintel and Bonn) for a folder of predictions.

    python benchmarks/eval_depth.py sintel --gt data/MPI-Sintel --pred runs/sintel_depth [--align scale_shift]

The same as ``fourdgen eval depth``; see fourdgen/evaluation/depth.py for the protocol.
"""

import sys

from fourdgen.evaluation.command import main

if __name__ == "__main__":
    main(["depth", *sys.argv[1:]])

"""The kernels benchmark, writing under bench/results/ (same options as `gradcomp bench kernels`,
whose code is gradcomp/benchmarks/kernels.py)."""

import os
import sys

from gradcomp.benchmarks.kernels import main

if __name__ == "__main__":
    sys.exit(main(out_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")))

"""The sparse benchmark, writing under bench/results/ (same options as `gradcomp bench sparse`,
whose code is gradcomp/benchmarks/sparse.py)."""

import os
import sys

from gradcomp.benchmarks.sparse import main

if __name__ == "__main__":
    sys.exit(main(out_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")))

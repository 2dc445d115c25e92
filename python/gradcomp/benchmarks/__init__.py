"""gradcomp's benchmarks (``gradcomp bench ...``); the methods they compare and how they start
their ranks are gradcomp.drivers'."""

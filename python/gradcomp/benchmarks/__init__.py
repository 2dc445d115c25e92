"""gradcomp's benchmarks and the training methods they compare (``gradcomp bench ...``)."""

"""`pyinf eval` benchmarks on small classifiers: mislabeled-data detection and the linear datamodeling score."""

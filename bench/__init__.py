"""`make bench`: every figure of the project, printed and written to bench/results.json."""

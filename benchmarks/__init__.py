"""Benchmarks of tike-trl against TRL's own k3 path (run from the repository root, see README)."""

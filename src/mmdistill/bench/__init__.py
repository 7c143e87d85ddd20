"""Benchmarks, an application layer over the public functions: `commands` (what `mmdistill bench` runs),
`iteration`, `storage`, `metrics`, `robustness`, and `models` (students sized without data)."""

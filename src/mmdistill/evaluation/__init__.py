"""Stage 4, evaluation: `student` (fresh students trained on a distilled set), `baselines` (coresets and full data)
and `results` (results entries, status against random, tables, the `evaluate` command)."""

"""Stage 2, expert trajectories: `store` (the file contract every later stage reads), `train`, `shortcut`
(PTM-ST's straightened windows) and `reference` (the published code's replay buffers)."""

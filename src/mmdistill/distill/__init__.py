"""Stage 3, distillation: `engine` (Algorithm 1: phases, iterations, EMA, checkpoints), `matching` (the gradient of
the trajectory-matching loss), `calibrate` (the phase's `auto` settings) and `collapse` (the watch that stops a
phase that no longer moves)."""

"""The run layer: one entry per command (`segment`, `refine`, `crf_tune`, `evaluate`), the engines it
picks (`lanes` on the CPU, the GPU `pipeline`, `ray_cluster`), the per-image `stages` they share, and
the budgets and controls around them (`scheduling`, `memory`, `pool`, `stop`)."""

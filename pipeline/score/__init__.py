"""Per-row scores of the outputs: the scorers the worker calls right after an edit, their models,
and scoring a committed shard after the fact. Below the worker, above the output folder."""

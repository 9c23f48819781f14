"""Per-row scores of the outputs: the scorers the worker calls right after an edit, on the same
device (`scorer`), the scorer models (`models`), and scoring a committed shard after the fact
(`shard`). Below the worker, above the output folder, which writes the sidecars."""

"""The output folder: its names, manifests, shard writer, job record, status and key counts."""

"""Reading inputs: shard patterns, tar members, decoded samples and per-row settings."""

"""One shard inside an actor, without Ray: batching, editing, encoding, records, the actor class."""

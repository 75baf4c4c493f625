"""The decode worker: reserves KV blocks, receives KV, streams tokens."""

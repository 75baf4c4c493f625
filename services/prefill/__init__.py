"""The prefill worker: chunked prefill with KV pushed to decode workers."""

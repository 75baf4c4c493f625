"""The colocated worker: prefill and decode in one engine with mixed batches (the baseline)."""

"""Plain types and helpers shared by the router, the load-test harness and the workers: errors, sampling
parameters, logprobs, the tokenizer and chat template, gRPC conversions. Imports neither torch nor the engine, so
the router runs without them."""

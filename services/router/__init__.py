"""The mesh router: OpenAI-compatible HTTP in front, gRPC to prefill/decode/colocated workers behind."""

"""`pdmesh bench`: a load-test harness for OpenAI-compatible endpoints, with pdmesh's TTFT breakdown."""

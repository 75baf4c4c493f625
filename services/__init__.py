"""pdmesh: prefill/decode-disaggregated LLM serving."""

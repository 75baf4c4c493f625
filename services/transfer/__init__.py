"""KV transfer between workers with the Mooncake Transfer Engine: staging, fence, push, receive."""

"""What every worker role shares: the gRPC server, the Worker service, and proto conversions."""

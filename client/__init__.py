"""Python client for the Inception v3 service (REST and gRPC)."""

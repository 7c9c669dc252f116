"""API adapters: Connect/gRPC/gRPC-Web handlers, REST, auth, error mapping, health, metrics."""

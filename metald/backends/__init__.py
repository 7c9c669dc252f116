"""VMM backends: adapters behind metald.ports.Backend."""

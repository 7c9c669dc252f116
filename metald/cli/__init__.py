"""Command-line entry points: `metald` (the daemon) and `metalctl` (the client)."""

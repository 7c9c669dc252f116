"""What every VMM backend shares: the per-VM supervisor, process supervision, sandboxing (user,
cgroup), the ready-line watch and the supervisor's files."""

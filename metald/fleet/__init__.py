"""Many hosts behind one API: the shared inventory in PostgreSQL, the host agent, the gateway."""

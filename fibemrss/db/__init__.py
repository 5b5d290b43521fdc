"""PostgreSQL access: the embedded server, connection pools and versioned migrations."""

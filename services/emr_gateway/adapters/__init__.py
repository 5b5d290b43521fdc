"""The gateway's adapters: the PostgreSQL store and its record encoding."""

"""The aggregator's adapters: its round store on PostgreSQL, and the same store in memory."""

"""The aggregator's edges: the gRPC servicer, converting requests and delegating to the core."""

"""The agent's edges: the gRPC servicer that reports the hospital's progress in the federation."""

"""Flower's FedAvg round, timed, for comparison with FIBEMRSS's encrypted round."""

"""Secure aggregation against an actively lying aggregator (double masking, Shamir shares,
signed cohorts and survivor sets, a sparse neighbour graph for large cohorts). Pure: no I/O."""

"""FIBEMRSS: the package the four services share (config, server bootstrap, store, HE codec, schema)."""

"""Load generators, benchmarks and the soak: tools that drive the services, never loaded by them."""

"""Development tools, apart from the runtime: the demo, local Label Studio/Redis launchers for
tests and benchmarks, and synthetic datasets. Nothing in the backend's service imports them."""

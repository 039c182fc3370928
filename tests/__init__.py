"""The test suite: a package, so tests and benches import its helpers as ``tests.<module>``."""

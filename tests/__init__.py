"""Test suite (a package so that tests/runtime does not shadow the runtime package)."""

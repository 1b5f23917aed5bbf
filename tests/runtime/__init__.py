"""Tests of runtime/: sampler, block allocator, engine, CLI."""

"""Graph passes: each a pure function Graph -> Graph in a file named for what it does."""
from lowering.passes.canonicalize import canonicalize
from lowering.passes.fuse_projections import fuse_projections
from lowering.passes.insert_paged_kv import insert_paged_kv

__all__ = ["canonicalize", "fuse_projections", "insert_paged_kv"]

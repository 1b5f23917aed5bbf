"""Graph passes: each a pure function Graph -> Graph in a file named for what it does."""
from lowering.passes.canonicalize import canonicalize
from lowering.passes.fuse_projections import fuse_projections
from lowering.passes.insert_paged_kv import insert_paged_kv
from lowering.passes.insert_speculation import insert_speculation
from lowering.speculation import Speculative

__all__ = ["canonicalize", "fuse_projections", "insert_paged_kv", "insert_speculation", "Speculative"]

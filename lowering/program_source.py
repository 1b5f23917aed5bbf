"""ProgramSource: what a compiled model and a loaded artifact share — building Programs from graph + params."""
from __future__ import annotations


class ProgramSource:
    """Mixin for classes with `graph`, `params`, `options` (CompileOptions) and `config` attributes."""

    @property
    def target(self) -> str:
        return self.options.target

    @property
    def block_size(self) -> int:
        return int(self.graph.meta["block_size"])

    @property
    def max_model_len(self) -> int:
        if self.options.max_model_len:
            return self.options.max_model_len
        return self.config.max_position_embeddings if self.config else 2048

    @property
    def tensor_parallel(self) -> int:
        """Ranks the graph is sharded over (1: unsharded)."""
        meta = self.graph.meta.get("tensor_parallel")
        return int(meta["tp"]) if meta else 1

    def with_tensor_parallel(self, tp: int):
        """A copy whose graph is sharded over `tp` ranks (shard_tensor_parallel; the params stay whole, each rank
        cuts its pieces when its Program is built). tp=1, or a graph already sharded that way, returns self."""
        import copy
        import dataclasses

        from lowering.passes.shard_tensor_parallel import shard_tensor_parallel
        from lowering.pipeline import OptionsError

        if tp == self.tensor_parallel:
            return self
        if self.tensor_parallel != 1:
            raise OptionsError(f"this model is compiled for tensor_parallel={self.tensor_parallel}; recompile it (or "
                               f"export it unsharded) to run it on {tp}")
        options = dataclasses.replace(self.options, tensor_parallel=tp).validate()
        out = copy.copy(self)
        out.graph, out.options = shard_tensor_parallel(self.graph, tp), options
        return out

    def make_program(self, *, num_blocks: int | None = None, max_num_seqs: int = 64,
                     max_model_len: int | None = None, **kwargs):
        from lowering.backends import build_program

        return build_program(self.target, self.graph, self.params, num_blocks=num_blocks,
                             max_num_seqs=max_num_seqs, max_model_len=max_model_len or self.max_model_len, **kwargs)

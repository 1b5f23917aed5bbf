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

    def make_program(self, *, num_blocks: int | None = None, max_num_seqs: int = 64,
                     max_model_len: int | None = None, **kwargs):
        from lowering.backends import build_program

        return build_program(self.target, self.graph, self.params, num_blocks=num_blocks,
                             max_num_seqs=max_num_seqs, max_model_len=max_model_len or self.max_model_len, **kwargs)

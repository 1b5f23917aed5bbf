"""StepInput.validate: every inconsistency is refused with a message naming it; well-formed steps pass."""
import dataclasses

import numpy as np
import pytest

from runtime.step import StepInput


def step(**changes) -> StepInput:
    """Two sequences: a 3-token prefill chunk (blocks 0, 1) and a decode at position 5 (block 2); block size 4."""
    base = StepInput(token_ids=np.array([5, 6, 7, 8], np.int32), positions=np.array([0, 1, 2, 5], np.int32),
                     slot_mapping=np.array([0, 1, 2, 9], np.int32), query_start=np.array([0, 3, 4], np.int32),
                     seq_lens=np.array([3, 6], np.int32), block_tables=np.array([[0, 1], [3, 2]], np.int32),
                     logit_rows=np.array([2, 3], np.int32))
    return dataclasses.replace(base, **{k: np.asarray(v, np.int32) for k, v in changes.items()})


def test_well_formed_steps_pass():
    step().validate(block_size=4, num_blocks=4)
    step(slot_mapping=[-1, 1, 2, 15]).validate(block_size=4, num_blocks=4)  # -1: write nothing; 15: the last slot
    empty = StepInput(*(np.zeros(0, np.int32) for _ in range(3)), np.zeros(1, np.int32), np.zeros(0, np.int32),
                      np.zeros((0, 1), np.int32), np.zeros(0, np.int32))
    empty.validate(block_size=4, num_blocks=4)
    two = step(block_tables_w=[[0, 1], [3, 2]], slot_mapping_w=[0, 1, 2, 9])
    two.validate(block_size=4, num_blocks=4, num_blocks_w=4)


@pytest.mark.parametrize("changes, message", [
    (dict(query_start=[1, 3, 4]), "query_start must rise from 0 to 4"),
    (dict(query_start=[0, 3, 5]), "query_start must rise from 0 to 4"),
    (dict(query_start=[0, 4, 3]), "query_start must rise"),
    (dict(seq_lens=[2, 6]), "seq_lens must be >= the new tokens"),
    (dict(seq_lens=[3, 9]), "longer than its block table allows \\(8 tokens\\)"),
    (dict(slot_mapping=[0, 1, 2, 16]), "slot outside the KV pool"),
    (dict(slot_mapping=[0, -2, 2, 9]), "slot outside the KV pool"),
    (dict(logit_rows=[2, 4]), "logit_rows points outside"),
    (dict(logit_rows=[-1]), "logit_rows points outside"),
    (dict(positions=[0, 1, 2]), "positions has shape"),
    (dict(block_tables=[[0, 1]]), "block_tables has shape"),
])
def test_inconsistent_steps_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        step(**changes).validate(block_size=4, num_blocks=4)


def test_second_kv_group_is_checked():
    with pytest.raises(ValueError, match="second KV group"):
        step().validate(block_size=4, num_blocks=4, num_blocks_w=4)
    with pytest.raises(ValueError, match="outside the second KV group's pool"):
        step(block_tables_w=[[0, 1], [3, 2]], slot_mapping_w=[0, 1, 2, 8]).validate(block_size=4, num_blocks=4,
                                                                                    num_blocks_w=2)

import numpy as np

from jobs.data import GlobalOrder, pack
from orchestrator.core.plan import Batching

EOS = 0


def test_documents_are_joined_with_eos_and_no_token_is_lost_or_duplicated():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    blocks, dropped = pack(docs, EOS, block_len=4)
    stream = [5, 6, 7, EOS, 8, EOS, 9, 10, 11, 12, 13, EOS, 14, 15, EOS]
    assert blocks.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert dropped == len(stream) - 12  # the final partial block [14, 15, EOS] is dropped and counted


def test_blocks_are_the_stream_prefix_and_only_a_partial_tail_is_dropped():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=rng.integers(1, 30)).tolist() for _ in range(200)]
    stream = [t for doc in docs for t in (*doc, EOS)]
    blocks, dropped = pack(docs, EOS, block_len=16)
    assert blocks.shape[1] == 16
    assert blocks.ravel().tolist() == stream[: blocks.size]
    assert dropped == len(stream) - blocks.size and 0 <= dropped < 16


def test_samples_of_a_step_do_not_depend_on_the_world_size():
    def step_samples(world: int, step: int) -> list[int]:
        order = GlobalOrder(37, Batching.of(16, 2, world), seed=3)
        accum = 16 // (2 * world)
        return sorted(int(b) for m in range(accum) for r in range(world) for b in order.block_indices(step, m, r))

    for step in range(6):  # crosses an epoch boundary (37 blocks, 16 per step)
        assert step_samples(1, step) == step_samples(2, step) == step_samples(4, step)


def test_ranks_read_disjoint_blocks_that_cover_an_epoch_once():
    order = GlobalOrder(32, Batching.of(8, 2, 2), seed=0)
    seen = [int(b) for step in range(4) for m in range(2) for r in range(2) for b in order.block_indices(step, m, r)]
    assert sorted(seen) == list(range(32))
    assert not np.array_equal(order.permutation(0), order.permutation(1))

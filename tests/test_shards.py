import numpy as np
import pytest

from zooaudit.data import plan_shards
from zooaudit.errors import ZooauditError


@pytest.mark.parametrize("n,size", [(1, 1), (10, 3), (539, 256), (512, 256), (5, 100)])
def test_shards_cover_every_sample_exactly_once(n, size):
    shards = plan_shards(n, size)
    covered = np.concatenate([np.arange(s.start, s.stop) for s in shards])
    assert np.array_equal(covered, np.arange(n))
    # aligned to the chunking: every shard but the last is exactly one chunk
    assert all(len(s) == size for s in shards[:-1]) and 0 < len(shards[-1]) <= size
    assert [s.index for s in shards] == list(range(len(shards)))


def test_empty_dataset_is_refused():
    with pytest.raises(ZooauditError, match="empty"):
        plan_shards(0, 10)

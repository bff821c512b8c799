"""k-fold cross-validation over an in-memory source's seeded split.

The test split stays where `data.split` puts it; the train and val samples together are cut
into `folds` contiguous folds of the same seeded permutation, and fold `index` validates.
So K runs with index 0..K-1 validate on every train+val sample exactly once and never see the
test split.
"""

from __future__ import annotations

from torch import Tensor


def rotate_fold(
    order: Tensor, sizes: tuple[int, int, int], fold: tuple[int, int]
) -> tuple[tuple[int, int, int], Tensor]:
    """Split sizes and sample order with fold `fold[0]` of `fold[1]` as the val split.

    Args:
        order: The seeded permutation of all samples, train then val then test.
        sizes: (train, val, test) sizes of that permutation.
        fold: (index, folds).

    Returns:
        The new (train, val, test) sizes and the reordered permutation, train first.
    """
    index, folds = fold
    pool = sizes[0] + sizes[1]
    bounds = [pool * i // folds for i in range(folds + 1)]
    start, end = bounds[index], bounds[index + 1]
    train = order[:pool]
    val = train[start:end]
    rest = order[:start].tolist() + order[end:pool].tolist()
    reordered = order.new_tensor(rest + val.tolist() + order[pool:].tolist())
    return (pool - (end - start), end - start, sizes[2]), reordered

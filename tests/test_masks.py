from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coar_dask.errors import ExperimentError
from coar_dask.core.masks import sample_mask, sample_masks


@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.lists(st.integers(0, 10**7), min_size=1, max_size=8),
    p=st.integers(1, 300),
    alpha=st.floats(0.01, 0.99),
)
@settings(max_examples=50, deadline=None)
def test_row_mask_is_a_pure_function_of_seed_and_row(seed, rows, p, alpha):
    batch = sample_masks(seed, rows, p, alpha)
    assert batch.shape == (len(rows), p) and batch.dtype == bool
    for k, row in enumerate(rows):
        np.testing.assert_array_equal(batch[k], sample_mask(seed, row, p, alpha))
    # Order and company do not matter.
    np.testing.assert_array_equal(sample_masks(seed, rows[::-1], p, alpha), batch[::-1])


def test_different_rows_and_seeds_differ():
    a = sample_masks(0, range(4), 2000, 0.1)
    assert not (a[0] == a[1]).all()
    assert not (sample_masks(1, range(4), 2000, 0.1) == a).all()


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_fraction_ablated_matches_alpha(alpha):
    masks = sample_masks(3, range(200), 1000, alpha)
    ablated = 1 - masks.mean()
    # 200k Bernoulli draws: 5 standard errors.
    assert abs(ablated - alpha) < 5 * np.sqrt(alpha * (1 - alpha) / masks.size)


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, "x"])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ExperimentError, match="alpha"):
        sample_masks(0, [0], 10, alpha)

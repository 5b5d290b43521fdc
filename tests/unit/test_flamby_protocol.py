"""FLamby's Fed-Heart-Disease protocol as the quality bench reproduces it: its 740-patient
filtering, its per-center split (scikit-learn's, re-implemented) and its 13 inputs."""

from __future__ import annotations

import hashlib

import numpy as np

from fibemrss.tools.bench.flamby_protocol import (
    CENTERS,
    flamby_train_test_split,
    load_centers,
    read_center,
)
from tests.conftest import shared_file

# The first test positions and a digest of the sorted test positions that scikit-learn 1.x's
# train_test_split(np.arange(n), train_size=0.66, test_size=0.34, random_state=43, shuffle=True,
# stratify=labels) gives each filtered center (computed once with scikit-learn, which the project
# does not depend on).
SKLEARN_TEST_SPLIT = {
    "cleveland": ([165, 42, 250, 65, 105, 53, 78, 202], "4f92f24211493e9c"),
    "hungary": ([68, 120, 188, 252, 236, 159, 48, 169], "8a7243ecfac687ba"),
    "switzerland": ([29, 32, 20, 40, 6, 5, 14, 18], "3b91f1b496a5f915"),
    "va-long-beach": ([112, 45, 92, 35, 76, 75, 85, 118], "d33b065e24338e93"),
}


def test_filtering_keeps_flambys_740_patients_and_the_split_is_scikit_learns() -> None:
    folder = shared_file("heart_disease")
    sizes = {}
    for name, file in CENTERS.items():
        x, y = read_center((folder / file).read_text())
        assert x.shape[1] == 10 and not np.isnan(x).any() and set(np.unique(y)) <= {0.0, 1.0}
        train, test = flamby_train_test_split(y)
        assert not set(train) & set(test) and len(train) + len(test) == len(y)
        first, digest = SKLEARN_TEST_SPLIT[name]
        assert test[:8].tolist() == first, name
        assert hashlib.sha256(np.sort(test).astype(np.int64).tobytes()).hexdigest()[:16] == digest, name
        sizes[name] = (len(y), len(train), len(test))
    assert sizes == {
        "cleveland": (303, 199, 104),
        "hungary": (261, 172, 89),
        "switzerland": (46, 30, 16),
        "va-long-beach": (130, 85, 45),
    }
    centers = load_centers(folder)
    assert {c.x_train.shape[1] for c in centers} == {13}  # 8 plain + cp (3) + restecg (2)
    # Each center is standardized by its own training rows; the pooled view by all of them.
    for c in centers:
        assert np.allclose(c.x_train[:, :8].mean(axis=0), 0.0, atol=1e-5)
    pooled = np.concatenate([c.x_train_pooled for c in centers])
    assert np.allclose(pooled[:, :8].mean(axis=0), 0.0, atol=1e-5)


def test_the_split_is_stratified_and_unstratified_when_a_class_has_two_rows_or_fewer() -> None:
    y = np.array([0.0] * 30 + [1.0] * 70)
    train, test = flamby_train_test_split(y)
    assert (len(train), len(test)) == (66, 34)
    assert int(y[train].sum()) == 46 and int(y[test].sum()) == 24  # 70 positives shared 0.66 / 0.34
    few = np.array([0.0, 0.0] + [1.0] * 20)
    train, test = flamby_train_test_split(few)
    assert len(train) + len(test) == 22 and not set(train) & set(test)

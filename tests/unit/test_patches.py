"""agent.patches: the per-axis matrices equal OpenCV's resizes, features and distances equal brute force."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.patches import (
    Fusion,
    PatchBank,
    PatchSpec,
    axis_matrix,
    grid_for,
    nearest_distances,
    patch_features,
)


def _opencv_resize(a: np.ndarray, dst: tuple[int, int]) -> np.ndarray:
    h, w = a.shape
    method = cv2.INTER_AREA if dst[0] <= h and dst[1] <= w else cv2.INTER_LINEAR
    return cv2.resize(a, (dst[1], dst[0]), interpolation=method)


@pytest.mark.parametrize(("src", "dst"), [((8, 12), (4, 6)), ((3, 5), (6, 10)), ((7, 7), (28, 28))])
def test_axis_matrices_without_smoothing_are_opencvs_resize(src, dst):
    a = np.random.default_rng(0).random(src).astype(np.float32)
    ours = axis_matrix(src[0], dst[0], 1) @ a @ axis_matrix(src[1], dst[1], 1).T
    np.testing.assert_allclose(ours, _opencv_resize(a, dst), atol=1e-5)


def test_smoothing_averages_the_neighbours_inside_the_map():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    smooth = axis_matrix(4, 4, 3) @ a @ axis_matrix(4, 4, 3).T
    assert smooth[1, 1] == pytest.approx(a[0:3, 0:3].mean())
    assert smooth[0, 0] == pytest.approx(a[0:2, 0:2].mean())  # the corner: 4 neighbours, not 9 with zeros


def test_patch_features_concatenate_every_channel_of_every_map_per_cell():
    rng = np.random.default_rng(1)
    maps = [rng.random((1, 8, 12, 3)).astype(np.float32), rng.random((2, 3, 5)).astype(np.float32)]
    grid = grid_for((8, 12))
    assert grid == (4, 6)
    feats = patch_features(maps, grid)
    assert feats.shape == (24, 8)
    # channel 1 of each map (columns 1 and 3 + 1): the two matrices applied to that channel alone
    for m, column in [(maps[0][0], 1), (maps[1], 4)]:
        a = m[..., 1]
        rows, cols = axis_matrix(a.shape[0], 4, 3), axis_matrix(a.shape[1], 6, 3)
        np.testing.assert_allclose(feats[:, column].reshape(4, 6), rows @ a @ cols.T, atol=1e-5)


def test_nearest_distances_are_brute_force_euclidean():
    rng = np.random.default_rng(2)
    bank, x = rng.normal(size=(50, 7)).astype(np.float32), rng.normal(size=(9, 7)).astype(np.float32)
    brute = np.sqrt(((x[:, None, :] - bank[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(nearest_distances(x, PatchBank.of(bank)), brute, rtol=1e-4, atol=1e-4)
    assert nearest_distances(bank[:3], PatchBank.of(bank)) == pytest.approx(0.0, abs=1e-2)


def test_fusion_averages_standardised_scores_and_refuses_bad_manifests():
    f = Fusion(gem_mean=0.1, gem_std=0.01, patch_mean=10.0, patch_std=2.0)
    assert f.fuse(0.12, 14.0) == pytest.approx(0.5 * (2.0 + 2.0))
    assert Fusion.from_manifest(f.to_manifest()) == f
    for bad in ({**f.to_manifest(), "gem_std": 0.0}, {**f.to_manifest(), "patch_mean": float("nan")}, [1, 2]):
        with pytest.raises(ValueError):
            Fusion.from_manifest(bad)


def test_patch_spec_round_trip_and_errors_name_the_key():
    spec = PatchSpec(outputs=("patch_0", "patch_1"), grid=(28, 28))
    assert PatchSpec.from_manifest(spec.to_manifest()) == spec
    with pytest.raises(ValueError, match="grid"):
        PatchSpec.from_manifest({"outputs": ["patch_0"], "grid": [28]})
    with pytest.raises(ValueError, match="outputs"):
        PatchSpec.from_manifest({"outputs": "patch_0", "grid": [28, 28]})


def test_worst_cells_is_the_mean_of_the_k_largest():
    from agent.patches import worst_cells

    d = np.array([[1.0, 9.0, 3.0, 7.0], [0.0, 0.0, 5.0, 1.0]])
    np.testing.assert_allclose(worst_cells(d, 1), [9.0, 5.0])
    np.testing.assert_allclose(worst_cells(d, 2), [8.0, 3.0])
    np.testing.assert_allclose(worst_cells(d, 99), d.mean(axis=1))  # k is capped at the cell count
    assert PatchSpec.from_manifest({"outputs": ["p"], "grid": [2, 2], "top_k": 3}).top_k == 3
    with pytest.raises(ValueError, match="top_k"):
        PatchSpec.from_manifest({"outputs": ["p"], "grid": [2, 2], "top_k": 5})

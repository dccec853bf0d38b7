"""The robustness gate: CIFAR-100-C corruptions on real test images, measured on a real model."""

from __future__ import annotations

import numpy as np
import pytest

from vit_pipeline import data, robustness
from vit_pipeline.config import make_config
from vit_pipeline.evaluate import predict_logits


def test_corruptions_change_real_images_reproducibly(real_cut):
    images = real_cut[2][:8]
    for name in ("gaussian_noise", "defocus_blur", "jpeg_compression", "brightness", "contrast"):
        mild = robustness.corrupt_images(images, name, 1, seed=3)
        harsh = robustness.corrupt_images(images, name, 5, seed=3)
        assert mild.dtype == np.uint8 and mild.shape == images.shape
        np.testing.assert_array_equal(mild, robustness.corrupt_images(images, name, 1, seed=3))  # seeded
        d_mild, d_harsh = (np.abs(x.astype(float) - images).mean() for x in (mild, harsh))
        assert 0 < d_mild < d_harsh, name  # severity 5 moves the pixels further than severity 1


def test_images_under_32_pixels_are_corrupted_at_32_and_keep_their_size(real_cut):
    """imagecorruptions refuses images under 32 pixels a side: a 16-pixel folder's run failed after training."""
    from PIL import Image

    small = np.stack([np.asarray(Image.fromarray(x).resize((16, 20))) for x in real_cut[2][:4]])
    for name in ("gaussian_noise", "defocus_blur", "jpeg_compression", "brightness", "contrast"):
        mild, harsh = (robustness.corrupt_images(small, name, s, seed=3) for s in (1, 5))
        assert mild.shape == small.shape and mild.dtype == np.uint8
        d_mild, d_harsh = (np.abs(x.astype(float) - small).mean() for x in (mild, harsh))
        assert 0 < d_mild < d_harsh, name


@pytest.mark.integration
def test_a_corrupted_test_split_scores_lower_than_the_clean_one(tmp_path, tiny_overrides):
    from vit_pipeline.model import load_model
    from vit_pipeline.train import train

    # Real handwritten digits and a model that learned them.
    cfg = make_config("quickstart", {**tiny_overrides, "patch_size": 4, "epochs": 6, "learning_rate": 0.003})
    splits = data.prepare(cfg)
    model = load_model(train(cfg, splits, tmp_path).model_path)
    names = ["gaussian_noise", "defocus_blur", "jpeg_compression", "brightness", "contrast"]
    (result,) = robustness.measure([lambda x: predict_logits(model, x)], splits.x_test, splits.y_test, names,
                                   [1, 3, 5], seed=0)  # fmt: skip
    assert result.clean_accuracy > 0.8 and len(result.rows) == 15
    assert result.mean_accuracy < result.clean_accuracy
    by = {(r["corruption"], r["severity"]): r["accuracy"] for r in result.rows}
    assert (
        by[("gaussian_noise", 5)] < by[("gaussian_noise", 1)] and by[("contrast", 5)] < result.clean_accuracy
    )
    metrics = result.metrics()
    assert metrics["robustness_relative_accuracy"] == pytest.approx(
        result.mean_accuracy / result.clean_accuracy
    )
    assert set(result.per_corruption()) == set(names)
    assert (
        result.outcome.startswith("mean corruption accuracy")
        and "5 corruptions x 3 severities" in result.outcome
    )
    assert robustness.plot(result, tmp_path / "r.png").stat().st_size > 10_000

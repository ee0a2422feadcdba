import pytest
import torch

from accuquant_pl.data.digits import DigitsDataModule, digits_tensors


def test_splits_are_disjoint_deterministic_and_cover_all():
    train, _ = digits_tensors(16, "train")
    held, _ = digits_tensors(16, "heldout")
    again, _ = digits_tensors(16, "heldout")
    assert torch.equal(held, again)
    assert len(train) + len(held) == 1797
    # No held-out image appears in the training split.
    dists = torch.cdist(held.flatten(1), train.flatten(1)).min(dim=1).values
    duplicated = (dists == 0).sum().item()
    assert duplicated <= 2, "the digits contain a few exact duplicates, not more"


def test_images_are_upsampled_to_range():
    images, labels = digits_tensors(16, "all")
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test"}, "unknown digits split 'test'"),
    ({"heldout_fraction": 1.5}, "heldout_fraction"),
    ({"image_size": 4}, "image_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits_tensors(**kwargs)


def test_datamodule_batches():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 16, 16) and labels.shape == (32,)
    assert len(dm.val_set) == 270

import torch

from accuquant_pl.evaluation.images import make_grid, side_by_side


def test_side_by_side_labels_each_half_and_keeps_the_grids():
    fp, q = torch.full((4, 1, 8, 8), 1.0), torch.full((4, 1, 8, 8), -1.0)  # white FP, black quantized samples
    image = side_by_side(fp, q, nrow=2, titles=("FP", "quantized"))
    left, right = make_grid(fp, nrow=2), make_grid(q, nrow=2)
    strip = image.shape[1] - left.shape[1]
    assert strip > 0 and image.shape[2] == left.shape[2] + 4 + right.shape[2]
    # below the strip: the two grids unchanged; in the strip: text (dark pixels) over each half
    assert torch.equal(image[:, strip:, : left.shape[2]], left)
    assert torch.equal(image[:, strip:, -right.shape[2]:], right)
    assert (image[:, :strip, : left.shape[2]] < 0.5).any()
    assert (image[:, :strip, -right.shape[2]:] < 0.5).sum() > (image[:, :strip, : left.shape[2]] < 0.5).sum(), \
        "'quantized' is longer than 'FP'"

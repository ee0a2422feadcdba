"""Sample-quality figures of the shipped FP teacher (for its model card): a digit classifier's view.

    python -m benchmarks.teacher_quality [--samples 512]
    python -m benchmarks.teacher_quality --teacher models/digits-dit --class-conditional --grid models/digits-dit/samples.png

Not FID: a logistic-regression classifier trained on the real training digits reads the samples; the
same figures for the real held-out digits are the reference. Also writes the sample grid PNG. A class-conditional
teacher (``--class-conditional``) samples seed i as class i % 10, and the share of samples the classifier reads as
their requested class is reported too.
"""

from __future__ import annotations

import argparse
import time

import torch

from accuquant_pl.data.digits import digits_tensors
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion.conditioning import ConditioningSpec
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.evaluation.digit_classifier import DigitClassifier, pixel_statistics_gap
from accuquant_pl.evaluation.images import make_grid, save_png
from accuquant_pl.evaluation.paired import samples_from
from benchmarks.common import REPO


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default=str(REPO / "models" / "digits-ddpm"))
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--grid", default=str(REPO / "models" / "digits-ddpm" / "samples.png"))
    p.add_argument("--class-conditional", action="store_true", help="sample seed i as class i %% 10")
    args = p.parse_args()
    start = time.time()
    unet = load_denoiser(args.teacher)
    spec = ConditioningSpec(class_labels=list(range(10))) if args.class_conditional else None
    scheduler = TrajectoryDataModule(pretrained=args.teacher, conditioning=spec).make_scheduler()
    seeds = list(range(args.samples))
    cond = (lambda chunk: spec.for_samples(torch.tensor(chunk))) if spec is not None else None
    with torch.no_grad():
        samples = samples_from(unet, scheduler, seeds, args.steps, cond=cond)
    seconds = time.time() - start
    save_png(make_grid(samples[:64]), args.grid)
    held, held_labels = digits_tensors(16, "heldout")
    train, _ = digits_tensors(16, "train")
    clf = DigitClassifier()
    print(f"teacher: {args.teacher}; {args.samples} DDIM-{args.steps} samples in {seconds:.0f} s")
    print(f"classifier accuracy on the {len(held)} real held-out digits: {clf.accuracy(held, held_labels):.3f}")
    print("| images | mean confidence | confident (p>=0.9) | class coverage | pixel-mean gap to train |")
    print("|---|---|---|---|---|")
    for name, images in (("real held-out digits", held), (f"teacher samples (DDIM {args.steps})", samples)):
        q = clf.score(images)
        gap = pixel_statistics_gap(images, train)
        print(f"| {name} | {q.confidence:.3f} | {q.confident_fraction:.3f} | {q.class_coverage:.3f} | {gap:.4f} |")
    if spec is not None:
        requested = torch.tensor(seeds) % 10
        print(f"samples read as their requested class: {clf.accuracy(samples, requested):.3f}")


if __name__ == "__main__":
    main()

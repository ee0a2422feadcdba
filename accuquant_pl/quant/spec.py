"""Typed quantization specifications: the user-facing :class:`QuantSpec` and per-layer configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .affine import check_bits, check_init_method, check_timestep_boundaries, is_off


@dataclass
class WeightQuantConfig:
    """How one layer's weight is quantized."""

    bits: int = 8
    """Weight bit width (2..8, or 16 = off)."""
    symmetric: bool = False
    """Symmetric (zero point 0) instead of asymmetric integer range."""
    per_channel: bool = True
    """Per-output-channel (axis 0) scales; False = one scale per tensor."""
    init: str = "mse"
    """Grid initialisation: 'mse', 'minmax' or 'percentile'."""
    percentile: float = 0.9999
    """Percentile used by the 'percentile' init."""
    mse_grid: int = 80
    """Number of clipping ratios tried by the 'mse' init."""
    adaround: bool = False
    """Learned AdaRound rounding instead of round-to-nearest."""


@dataclass
class ActQuantConfig:
    """How one activation tensor is quantized."""

    bits: int = 8
    """Activation bit width (2..8, or 16 = off)."""
    symmetric: bool = False
    """Symmetric (zero point 0) instead of asymmetric integer range."""
    per_channel: bool = False
    """Per-channel step sizes along the channel axis (only where the tensor has one)."""
    init: str = "percentile"
    """Initialisation from calibration statistics: 'percentile', 'mse' or 'minmax'."""
    percentile: float = 0.9999
    """Percentile used by the 'percentile' init."""
    mse_grid: int = 80
    """Number of clipping ratios tried by the 'mse' init."""
    max_samples: int = 65536
    """Bound on the number of activation values kept for percentile/MSE init (per timestep group)."""
    timestep_boundaries: list[float] = field(default_factory=list)
    """Timesteps at which the step size changes: group g covers boundaries[g-1] <= t < boundaries[g]
    (empty = one range for every timestep)."""


@dataclass
class LayerQuantConfig:
    """Quantization of one quantized layer: weight, input activation, optional skip split point."""

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    split: int | None = None
    """If set, the input's channels [0:split] and [split:] get separate activation quantizers."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerQuantConfig:
        """Inverse of ``dataclasses.asdict``."""
        return cls(WeightQuantConfig(**data["weight"]), ActQuantConfig(**data["act"]), data.get("split"))


@dataclass
class LayerOverride:
    """Bit widths for the modules whose names match ``pattern``."""

    pattern: str
    """fnmatch pattern on module names (``*`` crosses dots), or a regex prefixed with ``re:``."""
    weight_bits: int | None = None
    """Weight bits for matching layers (None = keep)."""
    act_bits: int | None = None
    """Activation bits for matching layers / attention processors (None = keep)."""


@dataclass
class QuantSpec:
    """What to quantize and how; validated on construction."""

    weight_bits: int = 8
    """Weight bit width of every layer (2..8, or 16 = off)."""
    act_bits: int = 8
    """Input-activation bit width of every layer and of attention matmul operands."""
    first_last_bits: int | None = 8
    """Weight and activation bits of the UNet's conv_in and conv_out where the rest is quantized (a tensor kind
    the spec keeps in float, e.g. activations at act_bits 16, stays float; None = same as the rest)."""
    input_bits: int | None = None
    """Bits of the network input: the sampler state x_t, conv_in's input activation (16 = kept in float; None =
    conv_in's activation bits as above). Overrides naming conv_in still win."""
    weight_init: str = "mse"
    """Weight grid initialisation: 'mse', 'minmax' or 'percentile'."""
    act_init: str = "percentile"
    """Activation initialisation from calibration statistics: 'percentile', 'mse' or 'minmax'."""
    act_percentile: float = 0.9999
    """Percentile for act_init='percentile' (and weight_init='percentile')."""
    weight_symmetric: bool = False
    """Symmetric weight quantization."""
    act_symmetric: bool = False
    """Symmetric activation quantization (softmax probabilities always use an asymmetric range)."""
    weight_per_channel: bool = True
    """Per-output-channel weight scales."""
    act_per_channel: bool = False
    """Per-channel activation scales (not possible for attention matmul operands)."""
    adaround: bool = False
    """AdaRound weight quantizers (learned rounding) instead of round-to-nearest."""
    quantize_attention_matmuls: bool = True
    """Quantize the operands of QK^T and softmax-V through a quantizing attention processor."""
    split_skip: bool | None = None
    """UNets: separate activation quantizers for the two halves of concatenated skip connections (None: on; a
    transformer has no skip concatenations and refuses True)."""
    mse_grid: int = 80
    """Number of clipping ratios tried by MSE initialisation."""
    act_max_samples: int = 65536
    """Bound on activation values kept per quantizer and timestep group for percentile/MSE initialisation."""
    act_timestep_groups: int = 4
    """Timestep-aware activation ranges: every activation quantizer gets this many step sizes, one per equal
    share of the model's training timesteps (4 over 1000 timesteps: t < 250, < 500, < 750, the rest). Each group
    is initialised from its own timesteps' statistics, learned, exported and applied by the deployed model from
    the timestep it is given. 1 = one range for all timesteps (the behaviour before this option). Ignored when
    act_timestep_boundaries is set."""
    act_timestep_boundaries: list[float] | None = None
    """Explicit group boundaries in training timesteps (group g covers boundaries[g-1] <= t < boundaries[g]);
    [] = one range. None = equal groups from act_timestep_groups, resolved by quantize() from the model's
    num_train_timesteps (the recorded and exported spec holds the resolved list)."""
    overrides: list[LayerOverride] = field(default_factory=list)
    """Per-name bit-width overrides, applied in order (later ones win)."""

    def __post_init__(self) -> None:
        self.overrides = [o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in self.overrides]
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        for name in ("first_last_bits", "input_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        check_init_method(self.weight_init, "weight_init")
        check_init_method(self.act_init, "act_init")
        if isinstance(self.act_timestep_groups, bool) or not isinstance(self.act_timestep_groups, int) \
                or self.act_timestep_groups < 1:
            raise ValueError(f"act_timestep_groups={self.act_timestep_groups!r} must be an integer >= 1")
        if self.act_timestep_boundaries is not None:
            check_timestep_boundaries(self.act_timestep_boundaries, "act_timestep_boundaries")
            self.act_timestep_boundaries = [float(b) for b in self.act_timestep_boundaries]
        if not 0.0 < self.act_percentile <= 1.0:
            raise ValueError(f"act_percentile={self.act_percentile!r} must be in (0, 1]")
        for i, o in enumerate(self.overrides):
            for name in ("weight_bits", "act_bits"):
                if getattr(o, name) is not None:
                    check_bits(getattr(o, name), f"overrides[{i}].{name} (pattern {o.pattern!r})")

    @property
    def needs_train_timesteps(self) -> bool:
        """True when the boundaries are equal shares of the model's training timesteps, still to be resolved."""
        return self.act_timestep_boundaries is None and self.act_timestep_groups > 1

    def timestep_boundaries(self, num_train_timesteps: int | None = None) -> list[float]:
        """The activation timestep-group boundaries: the explicit list, or ``act_timestep_groups`` equal shares
        of ``num_train_timesteps`` (``ValueError`` if that is needed and not given)."""
        if not self.needs_train_timesteps:
            return list(self.act_timestep_boundaries or [])
        groups = self.act_timestep_groups
        if num_train_timesteps is None:
            raise ValueError(f"act_timestep_groups={groups} needs the model's number of training timesteps: "
                             "quantize(model, spec, num_train_timesteps=...) resolves it, or set act_timestep_boundaries")
        if num_train_timesteps < groups:
            raise ValueError(f"act_timestep_groups={groups} exceeds the {num_train_timesteps} training timesteps")
        return [num_train_timesteps * g / groups for g in range(1, groups)]

    def resolved(self, num_train_timesteps: int | None) -> QuantSpec:
        """This spec with explicit ``act_timestep_boundaries`` (what a quantized model records and exports)."""
        return replace(self, act_timestep_boundaries=self.timestep_boundaries(num_train_timesteps))

    def weight_config(self, bits: int) -> WeightQuantConfig:
        """Weight config of a layer quantized at ``bits``."""
        return WeightQuantConfig(bits, self.weight_symmetric, self.weight_per_channel, self.weight_init,
                                 self.act_percentile, self.mse_grid, self.adaround)

    def act_config(self, bits: int) -> ActQuantConfig:
        """Activation config of a tensor quantized at ``bits``."""
        # A 16-bit (float) tensor has no step size, so no timestep groups either.
        boundaries = [] if is_off(bits) else self.timestep_boundaries()
        return ActQuantConfig(bits, self.act_symmetric, self.act_per_channel, self.act_init,
                              self.act_percentile, self.mse_grid, self.act_max_samples, boundaries)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    @classmethod
    def from_export(cls, data: dict[str, Any]) -> QuantSpec:
        """The spec recorded in a quantization map or calibration checkpoint (see :func:`with_legacy_timesteps`)."""
        return cls(**with_legacy_timesteps(data))


def with_legacy_timesteps(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded spec dict as it was meant: one written before timestep groups existed has neither timestep key
    and was quantized with one activation range (``act_timestep_boundaries: []``)."""
    if "act_timestep_groups" not in data and "act_timestep_boundaries" not in data:
        return {**data, "act_timestep_boundaries": []}
    return data

"""The typed settings of :class:`~accuquant_pl.calibration.BlockReconstruction`.

Each group is a dataclass whose attribute docstrings feed ``--help`` and whose ``__post_init__`` validates it
(errors name the ``--model.init_args`` key). :func:`resolve_settings` checks the groups against the objective:
an option the chosen objective does not use is an error, never silently ignored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from accuquant_pl.calibration.objectives import BLOCK_TARGETS, OBJECTIVES, ROLLOUT_TARGETS
from accuquant_pl.calibration.rollout import GRADIENT_MODES, Reduction

GradientMode = Literal["exact", "checkpointed", "approx", "stepwise"]
KEY = "--model.init_args"

DEFAULT_ROLLOUT_TARGET = "block_output"
# The gradient mode that measured best per rollout target on the digits teacher (W4A8, equal budget;
# docs/results_128_seeds.md).
DEFAULT_GRADIENT = {"block_output": "stepwise", "block_accumulated": "stepwise", "state": "approx"}
DEFAULT_ITERATIONS = 100
DEFAULT_LRS = {"lr_adaround": 1e-3, "lr_act_scale": 4e-5, "lr_weight_scale": 1e-4}


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{KEY}.{name}: unknown value {value!r}; choose one of {list(choices)}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{KEY}.{name} must be >= {low}, got {value}")


@dataclass
class Rounding:
    """AdaRound's rounding regulariser and its beta schedule (BRECQ's)."""

    weight: float = 0.01
    """Weight of the rounding regulariser."""
    warmup: float = 0.2
    """Fraction of a unit's iterations before the regulariser switches on."""
    beta_start: float = 20.0
    """Regulariser beta at the end of warm-up, annealed linearly to ``beta_end``."""
    beta_end: float = 2.0
    """Regulariser beta at the last iteration."""

    def __post_init__(self) -> None:
        _at_least("rounding.weight", self.weight, 0)
        if not 0 <= self.warmup < 1:
            raise ValueError(f"{KEY}.rounding.warmup must be in [0, 1), got {self.warmup}")
        if self.beta_end <= 0 or self.beta_start < self.beta_end:
            raise ValueError(f"{KEY}.rounding: need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}")


@dataclass
class FinalStage:
    """A whole-model stage after the last unit: every unit quantized with its rounding fixed, all activation step
    sizes and the quantized layers' (float) biases train together on the AccuQuant state objective (the fully
    quantized model rolled out over n-step groups against the FP trajectory)."""

    iterations: int = 200
    """Optimisation steps of the stage."""
    gradient: GradientMode = "approx"
    """Gradient mode of the stage's rollout ('approx': O(1) memory in n)."""
    recompute: bool = True
    """'approx' only: recompute each step's network evaluation for its backward (O(1) activation memory in n).
    False keeps the rollout's n step graphs: the same gradient bit for bit, one forward per step fewer (a fifth to
    a quarter less stage time on the digits teachers), n steps' activations in memory at once."""
    group_size: int | None = None
    """n of the stage's rollouts; None: the data module's group_size (the units' n)."""
    lr_bias: float = 1e-4
    """Adam learning rate of the quantized layers' biases (``lr_act_scale`` is the step sizes' rate, as in units)."""

    def __post_init__(self) -> None:
        _at_least("final_stage.iterations", self.iterations, 1)
        _choice("final_stage.gradient", self.gradient, GRADIENT_MODES)
        if not self.recompute and self.gradient != "approx":
            raise ValueError(f"{KEY}.final_stage.recompute=False keeps the step graphs of gradient 'approx'; "
                             f"final_stage.gradient {self.gradient!r} organises its backward pass itself")
        if self.group_size is not None:
            _at_least("final_stage.group_size", self.group_size, 1)
        if self.lr_bias <= 0:
            raise ValueError(f"{KEY}.final_stage.lr_bias must be > 0, got {self.lr_bias}")


@dataclass
class Ablations:
    """Research variants measured in docs/results_128_seeds.md and docs/results.md; the defaults are the method, users leave them alone."""

    state_loss_weight: float = 1.0
    """Weight of the AccuQuant state loss (rollout_target 'state'); 0 skips the rollout."""
    block_loss_weight: float = 0.0
    """Weight of a per-step block-output term on the group's n FP states, added to the state loss."""
    later_units: Literal["fp", "quantized"] = "fp"
    """Units after the current one run in 'fp' or 'quantized' with their initial parameters."""
    loss_reduction: Reduction = "sum_per_sample"
    """'sum_per_sample' (squared error summed per sample: BRECQ's scale against the regulariser) or 'mean'."""

    def __post_init__(self) -> None:
        _at_least("ablations.state_loss_weight", self.state_loss_weight, 0)
        _at_least("ablations.block_loss_weight", self.block_loss_weight, 0)
        _choice("ablations.later_units", self.later_units, ("fp", "quantized"))
        _choice("ablations.loss_reduction", self.loss_reduction, ("sum_per_sample", "mean"))


def as_group(cls: type, value: Any) -> Any:
    """A settings group from itself, its dict (a checkpoint's hyperparameters) or None."""
    return cls(**value) if isinstance(value, dict) else value


@dataclass(frozen=True)
class CalibrationSettings:
    """Every setting of a calibration, resolved (defaults filled in) and checked against the objective."""

    objective: str
    rollout_target: str | None
    gradient: str | None
    iterations_per_unit: int
    lrs: dict[str, float]
    act_calibration_samples: int
    rounding: Rounding
    final_stage: FinalStage | None
    ablations: Ablations = field(default_factory=Ablations)

    @property
    def needs_teacher_blocks(self) -> bool:
        """Whether the objective matches block outputs against the FP teacher's blocks (the teacher is kept)."""
        return self.objective == "per_step" or (self.objective == "accuquant" and (
            self.rollout_target in BLOCK_TARGETS or self.ablations.block_loss_weight > 0))

    @property
    def final_stage_iterations(self) -> int:
        return self.final_stage.iterations if self.final_stage is not None else 0


def resolve_settings(objective: str, rollout_target: str | None, gradient: str | None, iterations_per_unit: int | None,
                     lrs: dict[str, float], act_calibration_samples: int, rounding: Rounding | None,
                     final_stage: FinalStage | None, ablations: Ablations | None) -> CalibrationSettings:
    """The settings with the objective's defaults filled in; ``ValueError`` naming the key for an invalid value
    or an option the objective does not use."""
    _choice("objective", objective, (*OBJECTIVES, "rtn"))
    _at_least("act_calibration_samples", act_calibration_samples, 1)
    for name, lr in lrs.items():
        if lr <= 0:
            raise ValueError(f"{KEY}.{name} must be > 0, got {lr}")
    if objective == "rtn":
        _check_rtn(rollout_target, gradient, iterations_per_unit, lrs, rounding, final_stage, ablations)
        return CalibrationSettings(objective, None, None, 0, lrs, act_calibration_samples, Rounding(), None)
    iterations = DEFAULT_ITERATIONS if iterations_per_unit is None else iterations_per_unit
    _at_least("iterations_per_unit", iterations, 1)
    ablations = ablations or Ablations()
    if objective == "per_step":
        unused = [k for k, v in (("rollout_target", rollout_target), ("gradient", gradient)) if v is not None]
        if unused:
            raise ValueError(f"{KEY}.{unused[0]} is an option of objective 'accuquant'; objective 'per_step' "
                             "matches each step's block output and has no rollout: leave it out")
        _check_state_weights(ablations, None)
        return CalibrationSettings(objective, None, None, iterations, lrs, act_calibration_samples,
                                   rounding or Rounding(), final_stage, ablations)
    target = rollout_target or DEFAULT_ROLLOUT_TARGET
    _choice("rollout_target", target, ROLLOUT_TARGETS)
    mode = gradient or DEFAULT_GRADIENT[target]
    _choice("gradient", mode, GRADIENT_MODES)
    if target in BLOCK_TARGETS and mode != "stepwise":
        raise ValueError(f"{KEY}.gradient {mode!r}: rollout_target {target!r} takes its gradient step by step with "
                         "the rollout's states held constant, which is gradient 'stepwise' (the other modes "
                         "differentiate the n-step state: rollout_target 'state')")
    _check_state_weights(ablations, target)
    return CalibrationSettings(objective, target, mode, iterations, lrs, act_calibration_samples,
                               rounding or Rounding(), final_stage, ablations)


def _check_rtn(rollout_target: Any, gradient: Any, iterations_per_unit: Any, lrs: dict[str, float], rounding: Any,
               final_stage: Any, ablations: Any) -> None:
    given = {"rollout_target": rollout_target, "gradient": gradient, "iterations_per_unit": iterations_per_unit,
             "rounding": rounding, "final_stage": final_stage, "ablations": ablations}
    unused = [k for k, v in given.items() if v is not None]
    unused += [k for k, v in lrs.items() if v != DEFAULT_LRS[k]]
    if unused:
        raise ValueError(f"objective 'rtn' runs no optimisation, so {KEY}.{unused[0]} has no effect: leave it out "
                         f"(given: {unused})")


def _check_state_weights(ablations: Ablations, target: str | None) -> None:
    weights = (ablations.state_loss_weight, ablations.block_loss_weight)
    if target == "state":
        if weights == (0, 0):
            raise ValueError(f"{KEY}.ablations: state_loss_weight and block_loss_weight are both 0: the accuquant "
                             "objective has no loss")
    elif weights != (1.0, 0.0):
        raise ValueError(f"{KEY}.ablations.state_loss_weight / block_loss_weight weigh the terms of rollout_target "
                         f"'state'; with {target or 'objective per_step'!r} leave them out (got {weights})")


def plain(value: Any) -> Any:
    """A settings group as plain data (checkpoints load with ``torch.load(weights_only=True)``)."""
    return asdict(value) if value is not None else None

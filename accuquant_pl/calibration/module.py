"""Block-wise reconstruction as a LightningModule: epoch e calibrates reconstruction unit e."""

from __future__ import annotations

import copy
import random
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from diffusers import SchedulerMixin
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor, nn

from accuquant_pl.calibration.objectives import (
    BLOCK_TARGETS,
    OBJECTIVES,
    ROLLOUT_TARGETS,
    accuquant_block_accumulated_step,
    accuquant_block_step,
    accuquant_step,
    check_rollout_scheduler,
    group_block_loss,
    per_step_loss,
)
from accuquant_pl.calibration.rollout import GRADIENT_MODES, Reduction
from accuquant_pl.data.plan import EpochPlan
from accuquant_pl.data.trajectories import sub_batches
from accuquant_pl.diffusion.loading import load_scheduler_config, load_unet
from accuquant_pl.diffusion.sampling import network_inputs
from accuquant_pl.quant import (
    AdaRoundQuantizer,
    QuantSpec,
    adaround_regularizer,
    calibrate_activations,
    harden,
    layer_biases,
    quantize,
    reconstruction_units,
    set_quant_state,
    unit_parameters,
)
from accuquant_pl.quant.adaround import AdaRoundSchedule
from accuquant_pl.quant.convert import DEFAULT_TRAIN_TIMESTEPS, SPEC_ATTR
from accuquant_pl.quant.quantizers import MIN_SCALE
from accuquant_pl.quant.timesteps import check_groups_hold_timesteps, grouped_quantizers


def _rng_state() -> dict[str, Any]:
    # Plain tensors and numbers only, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss], "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


FINAL_STAGE = "final_stage"
"""The name of the whole-model epoch after the last unit (``final_stage_iterations`` > 0) in ``epoch_names``."""

# The gradient mode that measured best per rollout target on the digits teacher (W4A8, equal budget; docs/results.md).
DEFAULT_GRADIENT = {"block_output": "stepwise", "block_accumulated": "stepwise", "state": "approx"}


class BlockReconstruction(L.LightningModule):
    """Calibrates a quantized copy of an FP diffusers UNet unit by unit (BRECQ / Q-Diffusion / AccuQuant).

    ``setup`` quantizes the student and initialises its activation quantizers from the trajectory cache;
    every training epoch optimises one reconstruction unit (units before it quantized and frozen, units
    after it FP by default) and hardens its rounding at the end. ``objective='rtn'`` runs no epochs:
    round-to-nearest weights with calibrated activation ranges.
    """

    CHECKPOINT_SECTION = "accuquant"
    """The key of the calibration's own state in a checkpoint (done units, RNG, a mid-epoch position)."""

    def __init__(
        self,
        pretrained: str = "models/digits-ddpm",
        quant: QuantSpec | None = None,
        objective: Literal["per_step", "accuquant", "rtn"] = "accuquant",
        gradient: Literal["exact", "checkpointed", "approx", "stepwise"] | None = None,
        rollout_target: Literal["state", "block_output", "block_accumulated"] = "block_output",
        state_loss_weight: float = 1.0,
        block_loss_weight: float = 0.0,
        iterations_per_unit: int = 100,
        lr_adaround: float = 1e-3,
        lr_act_scale: float = 4e-5,
        lr_weight_scale: float = 1e-4,
        rounding_weight: float = 0.01,
        rounding_warmup: float = 0.2,
        beta_start: float = 20.0,
        beta_end: float = 2.0,
        loss_reduction: Reduction = "sum_per_sample",
        later_units: Literal["fp", "quantized"] = "fp",
        act_calibration_samples: int = 256,
        final_stage_iterations: int = 0,
        final_stage_gradient: Literal["exact", "checkpointed", "approx", "stepwise"] = "approx",
        final_stage_group_size: int | None = None,
        lr_bias: float = 1e-4,
    ) -> None:
        """
        Args:
            pretrained: the FP diffusers model folder (UNet + scheduler config).
            quant: the quantization spec (bit widths, initialisation, AdaRound, attention matmuls, overrides).
            objective: 'per_step' (block-output MSE on independent steps, Q-Diffusion/BRECQ), 'accuquant'
                (n-step rollout against the FP trajectory; n is the data module's group_size) or 'rtn'
                (no optimisation).
            gradient: AccuQuant gradient mode: exact, checkpointed (exact, O(1) activation memory), approx
                (no gradient through the network input on the recurrent path, O(1)) or stepwise. None (default)
                takes the mode that measured best for the rollout target (docs/results.md): 'stepwise' for
                'block_output' (its only mode), 'approx' for 'state'.
            rollout_target: what the AccuQuant rollout is matched on: 'block_output' (default: the calibrated
                block's output at each of the n rollout states, against the FP block on the FP states; needs
                gradient 'stepwise'), 'block_accumulated' (the same n block errors, loss on their mean: what
                keeps its sign along the rollout adds up in the sampler; gradient 'stepwise') or 'state' (the
                sampler state after the n steps, against the FP trajectory).
            state_loss_weight: weight of the AccuQuant state loss (rollout_target 'state'); 0 skips the rollout.
            block_loss_weight: weight of a per-step block-output term on the group's n FP states, added to
                the AccuQuant state loss (0: the pure state objective).
            iterations_per_unit: optimisation steps per reconstruction unit.
            lr_adaround: Adam learning rate of the AdaRound rounding variables.
            lr_act_scale: Adam learning rate of the LSQ activation step sizes.
            lr_weight_scale: Adam learning rate of weight step sizes (round-to-nearest weights only).
            rounding_weight: weight of the AdaRound rounding regulariser.
            rounding_warmup: fraction of a unit's iterations before the regulariser switches on.
            beta_start: regulariser beta at the end of warm-up (annealed linearly to beta_end).
            beta_end: regulariser beta at the last iteration.
            loss_reduction: 'sum_per_sample' (squared error summed per sample, BRECQ's scale against the
                regulariser) or 'mean' (per element).
            later_units: units after the current one run in 'fp' or 'quantized' with their initial parameters.
            act_calibration_samples: (x_k, t_k) samples from the trajectories that initialise activation ranges.
            final_stage_iterations: iterations of a whole-model stage after the last unit (0: none). Every unit
                is quantized with its rounding fixed, and all activation step sizes and the quantized layers'
                (float) biases train together on the AccuQuant state objective: the fully quantized model rolled
                out over n-step groups against the FP trajectory (n = 1: the per-step state error).
            final_stage_gradient: gradient mode of the final stage's rollout ('approx': O(1) memory in n).
            final_stage_group_size: n of the final stage's rollouts; None: the data module's group_size, the
                units' n. The data module serves the stage's epoch groups of this size (``epoch_plan``).
            lr_bias: Adam learning rate of the quantized layers' biases in the final stage (lr_act_scale is the
                step sizes' rate there as in the units).
        """
        super().__init__()
        if iterations_per_unit < 1 and objective != "rtn":
            raise ValueError(f"iterations_per_unit must be >= 1 for objective {objective!r}, got {iterations_per_unit}")
        if objective not in (*OBJECTIVES, "rtn"):
            raise ValueError(f"unknown objective {objective!r}; choose one of {(*OBJECTIVES, 'rtn')}")
        if rollout_target not in ROLLOUT_TARGETS:
            raise ValueError(f"unknown rollout_target {rollout_target!r}; choose one of {ROLLOUT_TARGETS}")
        if gradient is None:
            gradient = DEFAULT_GRADIENT[rollout_target]
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; choose one of {GRADIENT_MODES}")
        if objective == "accuquant" and rollout_target in BLOCK_TARGETS and gradient != "stepwise":
            raise ValueError(f"rollout_target {rollout_target!r} takes its gradient step by step with the rollout's states "
                             f"held constant, which is gradient 'stepwise'; got gradient {gradient!r} (the other "
                             "modes differentiate the n-step state: rollout_target 'state')")
        if state_loss_weight < 0 or block_loss_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got state_loss_weight={state_loss_weight}, "
                             f"block_loss_weight={block_loss_weight}")
        if objective == "accuquant" and rollout_target == "state" and state_loss_weight == 0 and block_loss_weight == 0:
            raise ValueError("state_loss_weight and block_loss_weight are both 0: the accuquant objective has no loss")
        if rollout_target in BLOCK_TARGETS and (block_loss_weight != 0 or state_loss_weight != 1):
            raise ValueError("state_loss_weight and block_loss_weight weigh the terms of rollout_target 'state'; "
                             f"with {rollout_target!r} leave them at 1 and 0 (got {state_loss_weight}, {block_loss_weight})")
        if act_calibration_samples < 1:
            raise ValueError(f"act_calibration_samples must be >= 1, got {act_calibration_samples}")
        if final_stage_iterations < 0:
            raise ValueError(f"final_stage_iterations must be >= 0, got {final_stage_iterations}")
        if final_stage_gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown final_stage_gradient {final_stage_gradient!r}; choose one of {GRADIENT_MODES}")
        if final_stage_group_size is not None and final_stage_group_size < 1:
            raise ValueError(f"final_stage_group_size must be >= 1 (or None), got {final_stage_group_size}")
        if final_stage_group_size is not None and final_stage_iterations == 0:
            raise ValueError(f"final_stage_group_size {final_stage_group_size} needs a final stage: set "
                             "final_stage_iterations > 0 (or leave final_stage_group_size None)")
        if objective == "rtn" and final_stage_iterations > 0:
            raise ValueError("objective 'rtn' runs no optimisation; set final_stage_iterations to 0 "
                             f"(got {final_stage_iterations})")
        self.save_hyperparameters()
        # A checkpoint's hyper_parameters (load_from_checkpoint, evaluation of --ckpt_path) hold the spec as plain data.
        self.spec = QuantSpec.from_dict(quant) if isinstance(quant, dict) else (quant or QuantSpec())
        # Saved as plain data too, so that a checkpoint of a plain-Trainer run loads with torch.load(weights_only=True).
        self.hparams["quant"] = self.spec.to_dict()
        self.automatic_optimization = False
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None  # FP block-output targets; not part of the checkpoint
        self.unit_names: list[str] = []
        self.done_units: list[str] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._lr_schedule: torch.optim.lr_scheduler.LRScheduler | None = None
        # The trajectories' scheduler (timesteps set), built once per fit; the objectives only copy it.
        self._scheduler: SchedulerMixin | None = None
        self._rounding_schedule: AdaRoundSchedule | None = None
        self._iteration = 0
        self._step_sizes: list[nn.Parameter] = []
        self.final_stage_done = False
        # The optimiser, lr schedule and iteration (and RNG) of an epoch a checkpoint was written in the middle of;
        # applied when training resumes inside that epoch (_begin_epoch, on_train_batch_start).
        self._resume_epoch: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None

    # ----- model construction (explicit, before any checkpoint is restored) -----
    def configure_model(self) -> None:
        if self.student is not None:
            return
        teacher = load_unet(self.hparams.pretrained)
        timesteps = (load_scheduler_config(self.hparams.pretrained).get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS)
                     if self.spec.needs_train_timesteps else DEFAULT_TRAIN_TIMESTEPS)
        student = quantize(copy.deepcopy(teacher), self.spec, timesteps)
        self.spec = getattr(student, SPEC_ATTR)  # the resolved spec (timestep groups as explicit boundaries)
        student.requires_grad_(False)
        self.student = student
        self.unit_names = [name for name, _ in reconstruction_units(student)]
        if self._block_targets:
            self.teacher = teacher

    @property
    def epoch_names(self) -> list[str]:
        """What each training epoch calibrates: the units in forward order, then ``FINAL_STAGE`` if enabled."""
        return self.unit_names + ([FINAL_STAGE] if self.hparams.final_stage_iterations > 0 else [])

    def _is_final_stage(self, epoch: int) -> bool:
        return epoch == len(self.unit_names)

    def epoch_iterations(self, epoch: int) -> int:
        """Optimisation steps of training epoch ``epoch``: ``iterations_per_unit``, or the final stage's."""
        hp = self.hparams
        return hp.final_stage_iterations if self._is_final_stage(epoch) else hp.iterations_per_unit

    def _trained(self, epoch: int) -> nn.Module:
        """The module whose quantization parameters epoch ``epoch`` trains: its unit, or the whole student."""
        return self.student if self._is_final_stage(epoch) else self.unit(epoch)

    @property
    def _block_targets(self) -> bool:
        hp = self.hparams
        return hp.objective == "per_step" or (hp.objective == "accuquant" and (hp.rollout_target in BLOCK_TARGETS
                                                                          or hp.block_loss_weight > 0))

    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = self.trainer.datamodule
        if stage == "fit":
            if self.trainer.precision == "16-mixed":
                # The rollouts call backward themselves and the per-unit optimisers are plain torch ones, so a
                # float16 GradScaler would never scale the losses nor unscale the gradients.
                raise ValueError("precision '16-mixed' needs a gradient scaler that block reconstruction does not "
                                 "apply; use 'bf16-mixed' (or 32)")
            self._scheduler = datamodule.make_scheduler()
            hp = self.hparams
            if hp.objective == "accuquant" or hp.final_stage_iterations > 0:
                check_rollout_scheduler(self._scheduler, datamodule.hparams.eta)
            if hp.final_stage_group_size is not None:  # __init__ allows it only with a final stage
                try:
                    datamodule.check_group_size(hp.final_stage_group_size)
                except ValueError as err:
                    raise ValueError(f"final_stage_group_size {hp.final_stage_group_size}: {err}") from err
            wanted = 0 if hp.objective == "rtn" else len(self.epoch_names)
            loop = self.trainer.fit_loop
            loop.max_epochs = wanted if loop.max_epochs in (None, -1) else min(loop.max_epochs, wanted)
        if grouped_quantizers(self.student):  # a weight-only spec has no activation ranges to group
            schedule = datamodule.make_scheduler()
            check_groups_hold_timesteps(self.spec.act_timestep_boundaries, schedule.timesteps,
                                        "quant.act_timestep_boundaries", schedule.config.num_train_timesteps)
        batches = datamodule.calibration_inputs(self.hparams.act_calibration_samples)
        calibrate_activations(self.student, [self._model_inputs(b, datamodule, self.student) for b in batches])
        if stage == "fit":
            # Every quantization parameter this fit may train requires grad from here until the first epoch
            # narrows it to that epoch's unit: a data-parallel strategy (DDP) wraps the module after ``setup``
            # and refuses a module with no trainable parameter (see ``_average_gradients``).
            for unit in self.unit_names:
                for params in unit_parameters(self.student.get_submodule(unit)).values():
                    for p in params:
                        p.requires_grad_(True)
            if self.hparams.final_stage_iterations > 0:
                for p in layer_biases(self.student):
                    p.requires_grad_(True)

    def epoch_plan(self) -> EpochPlan:
        """The epochs this calibration runs, as the data module serves them (it reads this; see EpochPlan): every
        epoch gets the longest epoch's batches (one that needs fewer stops early, ``on_train_batch_start``), and
        the final stage its own group size."""
        hp = self.hparams
        sizes = {len(self.unit_names): hp.final_stage_group_size} if hp.final_stage_group_size is not None else {}
        return EpochPlan(teacher=hp.pretrained, group_sizes=sizes,
                         batches_per_epoch=max(hp.iterations_per_unit, hp.final_stage_iterations))

    @staticmethod
    def _model_inputs(batch: dict[str, Any], datamodule: Any, unet: nn.Module | None = None) -> dict[str, Any]:
        # What the sampler feeds the network: under guidance the doubled [uncond, cond] batch (sampling.py).
        return network_inputs(unet, batch["x"], batch["timesteps"][:, 0], datamodule.conditioning(batch))

    def unit(self, index: int) -> nn.Module:
        return self.student.get_submodule(self.unit_names[index])

    # ----- one epoch = one unit -----
    def on_train_start(self) -> None:
        # Lightning does not call on_train_epoch_start again when it resumes from a checkpoint written inside an
        # epoch (it ran before that checkpoint), so the epoch's optimiser and schedules are set up here.
        if self.trainer.fit_loop.restarted_mid_epoch:
            self._begin_epoch(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self._begin_epoch(self.current_epoch)

    def _begin_epoch(self, e: int) -> None:
        later_quantized = self.hparams.later_units == "quantized"
        for i, name in enumerate(self.unit_names):
            on = i <= e or later_quantized
            set_quant_state(self.student.get_submodule(name), weight=on, act=on)
        self.student.requires_grad_(False)  # only this epoch's unit (or, in the final stage, its groups) trains
        self._optimizer = self._lr_schedule = None
        self.trainer.strategy.optimizers = []
        iters = self.epoch_iterations(e)
        self._rounding_schedule = AdaRoundSchedule(iters, self.hparams.rounding_weight, self.hparams.rounding_warmup,
                                                   self.hparams.beta_start, self.hparams.beta_end)
        if self.epoch_done(e):
            # A checkpoint written after this epoch's last step but before its end: nothing is left to train,
            # and the rest of its batches are skipped (on_train_batch_start).
            self._iteration = iters
            return
        # In the final stage every unit is hardened, so the student's groups hold no rounding variables.
        groups = unit_parameters(self._trained(e))
        if self._is_final_stage(e):
            groups["bias"] = layer_biases(self.student)
        self._step_sizes = [*groups.get("act_scale", []), *groups.get("weight_scale", [])]
        lrs = {"adaround": self.hparams.lr_adaround, "act_scale": self.hparams.lr_act_scale,
               "weight_scale": self.hparams.lr_weight_scale, "bias": self.hparams.lr_bias}
        param_groups = [{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps]
        for group in param_groups:
            for p in group["params"]:
                p.requires_grad_(True)
        if param_groups:
            self._optimizer = torch.optim.Adam(param_groups)
            self._lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self._optimizer, T_max=iters)
            # Registered with the strategy and stepped through Lightning's optimizer wrapper, so that Lightning
            # counts the steps (trainer.global_step): checkpoint callbacks save only when that count moved.
            self.trainer.strategy.optimizers = [self._optimizer]
        self._iteration = 0
        self._resume_mid_epoch(e)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("calib/unit", self.epoch_names[e], global_step=e)

    def epoch_done(self, e: int) -> bool:
        """True once epoch ``e`` has taken all its steps (its unit hardened, or the final stage finished)."""
        return self.final_stage_done if self._is_final_stage(e) else self.unit_names[e] in self.done_units

    def _resume_mid_epoch(self, e: int) -> None:
        """Continue epoch ``e`` where a checkpoint written inside it left off: optimiser and lr schedule state,
        iteration count (the data module's loader resumes at the same batch)."""
        state, self._resume_epoch = self._resume_epoch, None
        if state is None:
            return
        if state["epoch"] != e:
            raise RuntimeError(f"the checkpoint was written inside epoch {state['epoch']} "
                               f"({self.epoch_names[state['epoch']]}), but training resumed at epoch {e}")
        if self._optimizer is not None:
            self._optimizer.load_state_dict(state["optimizer"])
            self._lr_schedule.load_state_dict(state["lr_schedule"])
        self._iteration = int(state["iteration"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self._resume_rng is not None:
            # A mid-epoch checkpoint's RNG state is the one the next step of the uninterrupted run starts from;
            # restored here, after the resumed epoch's data loader was set up.
            _set_rng_state(self._resume_rng)
            self._resume_rng = None
        return -1 if self._iteration >= self.epoch_iterations(self.current_epoch) else None

    def _reducer_off(self) -> AbstractContextManager:
        # The strategy's ``block_backward_sync`` (DDP's ``no_sync``): backward passes inside leave DDP's reducer
        # idle, ``_average_gradients`` synchronises instead. Lightning re-enables the reducer after every
        # manual-optimisation forward, hence a context per training step.
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        with self._reducer_off():
            return self._training_step(batch)

    def _training_step(self, batch: dict[str, Any] | list[dict[str, Any]]) -> Tensor:
        e = self.current_epoch
        unit = self._trained(e)
        beta, weight = self._rounding_schedule(self._iteration)
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
        # A batch with several group starts comes as one sub-batch per start (collate_by_start): each is
        # rolled out on its own and weighted by its share of the items, so the gradient is the whole batch's.
        parts = sub_batches(batch)
        num_items = sum(len(part["x"]) for part in parts)
        loss = torch.zeros((), device=self.device)
        terms: dict[str, Tensor] = {}
        for part in parts:
            share = len(part["x"]) / num_items
            part_loss, part_terms = self._objective(part, unit, share)
            loss = loss + share * part_loss
            for key, value in part_terms.items():
                terms[key] = terms.get(key, 0.0) + share * value
        rounding = adaround_regularizer(unit, beta).to(self.device)
        if weight > 0 and rounding.requires_grad:
            self.manual_backward(weight * rounding)
        if self._optimizer is not None:
            self._average_gradients()
            self.optimizers().step()
            self._lr_schedule.step()
            with torch.no_grad():
                # A step size an Adam step took below MIN_SCALE is put back on it: the forward clamps there anyway,
                # and a stored step size <= 0 would be an invalid quantizer (refused on load and export).
                for p in self._step_sizes:
                    p.clamp_(min=MIN_SCALE)
        self._iteration += 1
        # sync_dist: the logged loss is the mean over the ranks' shards of the global batch.
        self.log_dict({"calib/loss": loss, "calib/rounding": rounding.detach(), "calib/unit": float(e), **terms},
                      prog_bar=True, on_step=True, on_epoch=False, sync_dist=True, batch_size=num_items)
        if self._iteration == self.epoch_iterations(e):
            self._finish_epoch(e)
        return loss

    def _objective(self, batch: dict[str, Any], unit: nn.Module, share: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Back-propagate ``share`` times the objective on one single-start batch; return its (unscaled) loss
        and, for the state target, its weighted terms."""
        if self._optimizer is None:
            # Nothing to calibrate in this unit (e.g. a class-embedding table, which is not quantized): the
            # objective would have no gradient to take, so its iterations only advance the schedule.
            return torch.zeros((), device=self.device), {}
        e, hp = self.current_epoch, self.hparams
        cond = self.trainer.datamodule.conditioning(batch)
        if self._is_final_stage(e):
            loss = accuquant_step(self.student, self._scheduler, batch, cond, hp.final_stage_gradient,
                                  hp.loss_reduction, share)
            return loss, {}
        teacher_block = self.teacher.get_submodule(self.unit_names[e]) if self.teacher is not None else None
        if hp.objective == "per_step":
            loss = per_step_loss(self.student, self.teacher, unit, teacher_block, self._scheduler, batch, cond,
                                 hp.loss_reduction)
            self.manual_backward(loss * share)
            return loss.detach(), {}
        if hp.rollout_target in BLOCK_TARGETS:
            step = accuquant_block_step if hp.rollout_target == "block_output" else accuquant_block_accumulated_step
            return step(self.student, self.teacher, unit, teacher_block, self._scheduler, batch, cond,
                        hp.loss_reduction, share), {}
        # Each term calls backward itself (scaled by its weight); the logged loss is their weighted sum.
        terms: dict[str, Tensor] = {}
        if hp.state_loss_weight > 0:
            terms["calib/state_loss"] = accuquant_step(self.student, self._scheduler, batch, cond, hp.gradient,
                                                       hp.loss_reduction, hp.state_loss_weight * share)
        if hp.block_loss_weight > 0:
            terms["calib/block_loss"] = group_block_loss(self.student, self.teacher, unit, teacher_block,
                                                         self._scheduler, batch, cond, hp.loss_reduction,
                                                         hp.block_loss_weight * share)
        loss = (hp.state_loss_weight * terms.get("calib/state_loss", 0.0)
                + hp.block_loss_weight * terms.get("calib/block_loss", 0.0))
        return loss, terms

    def _average_gradients(self) -> None:
        """Average the current unit's gradients over the ranks of a data-parallel strategy (no-op on one).

        DDP's own gradient synchronisation cannot serve block reconstruction: its reducer is built once, when
        the strategy wraps the module, over the parameters that require grad at that moment, and it expects
        one backward per forward, reaching every registered parameter. Here the trainable set changes every
        epoch (one unit each), AdaRound's V is dropped when a unit hardens, and a training step calls backward
        several times (rounding regulariser, approx / stepwise rollouts). So training steps run under DDP's
        ``no_sync`` (``_reducer_off``) and, before every optimiser step, the unit's gradients go through one
        ``strategy.reduce(mean)`` of a flat buffer. Each rank's loss is a mean over its equal-sized shard of
        the global batch, so the mean of the ranks' gradients is the gradient of the global batch; the
        rounding regulariser's gradient is the same on every rank and averages to itself. Every rank then
        takes the same Adam step from the same state, and the ranks stay identical (checked per unit).
        """
        if self.trainer.world_size <= 1:
            return
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        # Every rank sends a buffer of the same size (zeros for a missing gradient), so no rank can wait on a
        # collective the others skip; a parameter without a gradient keeps None, as on one device.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for p in params:
            if p.grad is not None:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def _check_ranks_agree(self, e: int) -> None:
        """Raise if the ranks of a data-parallel run ended unit ``e`` with different quantization states."""
        if self.trainer.world_size <= 1:
            return
        unit = self._trained(e)
        local = torch.stack([t.detach().double().sum() for t in (*unit.parameters(), *unit.buffers())]
                            or [torch.zeros((), dtype=torch.float64)]).cpu()
        gathered = self.all_gather(local.to(self.device)).cpu()
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"ranks disagree on {self.epoch_names[e]} after calibrating it: their gradient "
                               "averaging or their data is not consistent")

    def _finish_epoch(self, e: int) -> None:
        # Hardened here, inside the last step, so that the epoch-end checkpoint already holds the final rounding.
        trained = self._trained(e)
        if self._is_final_stage(e):
            self.final_stage_done = True
        else:
            harden(trained, "learned")
            self.done_units.append(self.unit_names[e])
        for p in trained.parameters():
            p.requires_grad_(False)
        self._optimizer = self._lr_schedule = None
        self.trainer.strategy.optimizers = []
        self._check_ranks_agree(e)

    def on_train_epoch_end(self) -> None:
        e = self.current_epoch
        if not self.epoch_done(e):
            raise RuntimeError(f"{self.epoch_names[e]} got fewer than its {self.epoch_iterations(e)} iterations' batches; "
                               "the data module must yield that many")

    def finalize(self) -> nn.Module:
        """The calibrated student, fully quantized; units never calibrated (rtn, or a run stopped early by
        ``max_epochs``) get round-to-nearest rounding. Idempotent."""
        harden(self.student, "nearest")
        set_quant_state(self.student, weight=True, act=True)
        return self.student

    def on_fit_end(self) -> None:
        self.finalize()

    # ----- checkpoints: done units are hardened, so rebuild that structure before the state dict loads -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.CHECKPOINT_SECTION] = {
            "done_units": list(self.done_units),
            "final_stage_done": self.final_stage_done,
            "rng": _rng_state(),
            "precision": str(self.trainer.precision),  # compared on resume (a result-changing trainer setting)
            "mid_epoch": None,
        }
        e = self.current_epoch
        if self._iteration > 0 and e < len(self.epoch_names) and not self.epoch_done(e):
            # Written inside an epoch (a time-based checkpoint): what its remaining steps need. The optimiser's
            # state is Lightning's own checkpoint["optimizer_states"] (the epoch's Adam is the strategy's).
            checkpoint[self.CHECKPOINT_SECTION]["mid_epoch"] = {
                "epoch": e,
                "iteration": self._iteration,
                "lr_schedule": self._lr_schedule.state_dict() if self._lr_schedule is not None else None,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        state = checkpoint.get(self.CHECKPOINT_SECTION)
        if state is None:
            raise ValueError(f"checkpoint has no {self.CHECKPOINT_SECTION!r} section: it was not written by "
                             "BlockReconstruction")
        unknown = [n for n in state["done_units"] if n not in self.unit_names]
        if unknown:
            raise ValueError(f"checkpoint names units {unknown} that this model does not have")
        for name in state["done_units"]:
            for q in self.student.get_submodule(name).modules():
                if isinstance(q, AdaRoundQuantizer) and not q.hardened and not q.is_off:
                    q.mark_hardened(tuple(q.alpha.shape))
        self.done_units = list(state["done_units"])
        self.final_stage_done = bool(state.get("final_stage_done", False))  # older checkpoints have no stage
        self._resume_epoch = state.get("mid_epoch")
        if self._resume_epoch is not None and self._resume_epoch["lr_schedule"] is not None:
            optimizer_states = checkpoint.get("optimizer_states") or []
            if len(optimizer_states) != 1:
                raise ValueError("the checkpoint was written inside an epoch but holds no optimiser state (saved "
                                 "weights-only?); resume from a checkpoint saved at the end of a unit")
            self._resume_epoch = {**self._resume_epoch, "optimizer": optimizer_states[0]}
        if self._resume_epoch is None:
            _set_rng_state(state["rng"])
        else:
            self._resume_rng = state["rng"]

    def configure_optimizers(self) -> None:
        # One optimiser per epoch, built and registered with the strategy when the epoch begins (_begin_epoch).
        return None

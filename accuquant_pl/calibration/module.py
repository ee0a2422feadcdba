"""Block-wise reconstruction as a LightningModule: epoch e calibrates reconstruction unit e."""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn

from accuquant_pl.calibration.checkpoint import (
    CHECKPOINT_SECTION,
    mid_epoch_state,
    progress_section,
    restore_hardened_units,
    restore_hyperparameters,
    resume_epoch_position,
    rng_untouched,
    saved_progress,
    set_rng_state,
)
from accuquant_pl.calibration.config import (
    DEFAULT_LRS,
    Ablations,
    FinalStage,
    GradientMode,
    Rounding,
    as_group,
    plain,
    resolve_settings,
)
from accuquant_pl.calibration.distributed import average_gradients, check_ranks_agree, reducer_off
from accuquant_pl.calibration.objectives import (
    FINAL_STAGE,
    check_rollout_scheduler,
    epoch_objective,
)
from accuquant_pl.calibration.optim import epoch_optimizer, epoch_parameters
from accuquant_pl.data.batching import sub_batches
from accuquant_pl.data.plan import EpochPlan
from accuquant_pl.diffusion.hub import pinned
from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config
from accuquant_pl.diffusion.sampling import network_inputs
from accuquant_pl.quant import (
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
from accuquant_pl.quant.affine import MIN_SCALE
from accuquant_pl.quant.convert import DEFAULT_TRAIN_TIMESTEPS, SPEC_ATTR
from accuquant_pl.quant.timesteps import check_groups_hold_timesteps, grouped_quantizers


class BlockReconstruction(L.LightningModule):
    """Calibrates a quantized copy of an FP diffusers UNet unit by unit (BRECQ / Q-Diffusion / AccuQuant).

    ``setup`` quantizes the student and initialises its activation quantizers from the trajectory cache; each
    training epoch optimises one reconstruction unit (units before it quantized and frozen, units after it FP by
    default) and hardens its rounding. ``objective='rtn'`` runs no epochs: round-to-nearest, calibrated ranges.
    """

    CHECKPOINT_SECTION = CHECKPOINT_SECTION
    """The key of the calibration's own state in a checkpoint (done units, RNG, a mid-epoch position)."""

    def __init__(
        self,
        pretrained: str = "models/digits-ddpm",
        quant: QuantSpec | None = None,
        objective: Literal["per_step", "accuquant", "rtn"] = "accuquant",
        rollout_target: Literal["state", "block_output", "block_accumulated"] | None = None,
        gradient: GradientMode | None = None,
        iterations_per_unit: int | None = None,
        lr_adaround: float = DEFAULT_LRS["lr_adaround"],
        lr_act_scale: float = DEFAULT_LRS["lr_act_scale"],
        lr_weight_scale: float = DEFAULT_LRS["lr_weight_scale"],
        act_calibration_samples: int = 256,
        rounding: Rounding | None = None,
        final_stage: FinalStage | None = None,
        ablations: Ablations | None = None,
    ) -> None:
        """
        Args:
            pretrained: the FP diffusers model: a folder (denoiser + scheduler config) or a Hub id (owner/name[@rev][:sub]).
            quant: the quantization spec (bit widths, initialisation, AdaRound, attention matmuls, overrides).
            objective: 'per_step' (block-output MSE on independent steps, Q-Diffusion/BRECQ), 'accuquant'
                (n-step rollout against the FP trajectory; n is the data module's group_size) or 'rtn'
                (no optimisation: round-to-nearest weights, activation ranges from the trajectories).
            rollout_target: accuquant only: what the rollout is matched on: 'block_output' (default: the calibrated
                block's output at each of the n rollout states, against the FP block on the FP states),
                'block_accumulated' (the same n block errors, loss on their mean) or 'state' (the sampler state
                after the n steps, against the FP trajectory).
            gradient: accuquant only: exact, checkpointed (exact, O(1) activation memory), approx (no gradient
                through the network input on the recurrent path, O(1)) or stepwise. Default: the mode that
                measured best for the rollout target ('stepwise' for the block targets, its only mode; 'approx'
                for 'state').
            iterations_per_unit: optimisation steps per reconstruction unit (default 100; not for 'rtn').
            lr_adaround: Adam learning rate of the AdaRound rounding variables.
            lr_act_scale: Adam learning rate of the LSQ activation step sizes.
            lr_weight_scale: Adam learning rate of weight step sizes (round-to-nearest weights only).
            act_calibration_samples: (x_k, t_k) samples from the trajectories that initialise activation ranges.
            rounding: the AdaRound regulariser's weight and schedule (:class:`Rounding`).
            final_stage: a whole-model stage after the last unit (:class:`FinalStage`); None: no stage.
            ablations: research variants (:class:`Ablations`); the defaults are the method.
        """
        super().__init__()
        lrs = {"lr_adaround": lr_adaround, "lr_act_scale": lr_act_scale, "lr_weight_scale": lr_weight_scale}
        groups = {"rounding": as_group(Rounding, rounding), "final_stage": as_group(FinalStage, final_stage),
                  "ablations": as_group(Ablations, ablations)}
        self.settings = resolve_settings(objective, rollout_target, gradient, iterations_per_unit, lrs,
                                         act_calibration_samples, **groups)
        self.save_hyperparameters()
        # Plain data in the checkpoint's hyper_parameters: it loads with torch.load(weights_only=True).
        self.spec = QuantSpec.from_dict(quant) if isinstance(quant, dict) else (quant or QuantSpec())
        self.hparams["quant"] = self.spec.to_dict()
        self.hparams.update({name: plain(group) for name, group in groups.items()})
        self.automatic_optimization = False
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What a fit builds and a checkpoint restores: models, units done, the epoch's optimiser and position."""
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None  # FP block-output targets; not part of the checkpoint
        self.pinned_pretrained: str | None = None  # ``pretrained`` as loaded, a Hub id pinned to its commit
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
        teacher = load_denoiser(self.hparams.pretrained)
        self.pinned_pretrained = pinned(self.hparams.pretrained)
        timesteps = (load_scheduler_config(self.hparams.pretrained).get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS)
                     if self.spec.needs_train_timesteps else DEFAULT_TRAIN_TIMESTEPS)
        student = quantize(copy.deepcopy(teacher), self.spec, timesteps)
        self.spec = getattr(student, SPEC_ATTR)  # the resolved spec (timestep groups as explicit boundaries)
        student.requires_grad_(False)
        self.student = student
        self.unit_names = [name for name, _ in reconstruction_units(student)]
        if self.settings.needs_teacher_blocks:
            self.teacher = teacher

    @property
    def epoch_names(self) -> list[str]:
        """What each training epoch calibrates: the units in forward order, then ``FINAL_STAGE`` if enabled."""
        return self.unit_names + ([FINAL_STAGE] if self.settings.final_stage is not None else [])

    def _is_final_stage(self, epoch: int) -> bool:
        return epoch == len(self.unit_names)

    def epoch_iterations(self, epoch: int) -> int:
        """Optimisation steps of training epoch ``epoch``: ``iterations_per_unit``, or the final stage's."""
        st = self.settings
        return st.final_stage_iterations if self._is_final_stage(epoch) else st.iterations_per_unit

    def _trained(self, epoch: int) -> nn.Module:
        """The module whose quantization parameters epoch ``epoch`` trains: its unit, or the whole student."""
        return self.student if self._is_final_stage(epoch) else self.unit(epoch)

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
            st = self.settings
            if st.objective == "accuquant" or st.final_stage is not None:
                check_rollout_scheduler(self._scheduler, datamodule.hparams.eta, datamodule.serves_step_noise)
            stage_n = st.final_stage.group_size if st.final_stage is not None else None
            if stage_n is not None:
                try:
                    datamodule.check_group_size(stage_n)
                except ValueError as err:
                    raise ValueError(f"--model.init_args.final_stage.group_size {stage_n}: {err}") from err
            wanted = 0 if st.objective == "rtn" else len(self.epoch_names)
            loop = self.trainer.fit_loop
            loop.max_epochs = wanted if loop.max_epochs in (None, -1) else min(loop.max_epochs, wanted)
        if grouped_quantizers(self.student):  # a weight-only spec has no activation ranges to group
            schedule = datamodule.make_scheduler()
            check_groups_hold_timesteps(self.spec.act_timestep_boundaries, schedule.timesteps,
                                        "quant.act_timestep_boundaries", schedule.config.num_train_timesteps)
        batches = datamodule.calibration_inputs(self.settings.act_calibration_samples)
        # What the sampler feeds the network: under guidance the doubled [uncond, cond] batch (sampling.py).
        calibrate_activations(self.student, [network_inputs(self.student, b["x"], b["timesteps"][:, 0],
                                                            datamodule.conditioning(b)) for b in batches])
        if stage == "fit":
            # Until the first epoch narrows it to its unit: DDP wraps the module after ``setup`` and refuses a
            # module with no trainable parameter.
            for p in self._fit_parameters():
                p.requires_grad_(True)

    def _fit_parameters(self) -> list[nn.Parameter]:
        """Every quantization parameter this fit may train."""
        units = [unit_parameters(self.student.get_submodule(name)) for name in self.unit_names]
        biases = layer_biases(self.student) if self.settings.final_stage is not None else []
        return [p for groups in units for params in groups.values() for p in params] + list(biases)

    def epoch_plan(self) -> EpochPlan:
        """The epochs this calibration runs, as the data module serves them (it reads this; see EpochPlan): every
        epoch gets the longest epoch's batches (one that needs fewer stops early, ``on_train_batch_start``), and
        the final stage its own group size."""
        st = self.settings
        stage_n = st.final_stage.group_size if st.final_stage is not None else None
        sizes = {len(self.unit_names): stage_n} if stage_n is not None else {}
        return EpochPlan(pretrained=self.hparams.pretrained, group_sizes=sizes,
                         batches_per_epoch=max(st.iterations_per_unit, st.final_stage_iterations))

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
        later_quantized = self.settings.ablations.later_units == "quantized"
        for i, name in enumerate(self.unit_names):
            on = i <= e or later_quantized
            set_quant_state(self.student.get_submodule(name), weight=on, act=on)
        self.student.requires_grad_(False)  # only this epoch's unit (or, in the final stage, its groups) trains
        self._optimizer = self._lr_schedule = None
        self.trainer.strategy.optimizers = []
        iters = self.epoch_iterations(e)
        r = self.settings.rounding
        self._rounding_schedule = AdaRoundSchedule(iters, r.weight, r.warmup, r.beta_start, r.beta_end)
        if self.epoch_done(e):
            # A checkpoint written after this epoch's last step but before its end: nothing is left to train,
            # and the rest of its batches are skipped (on_train_batch_start).
            self._iteration = iters
            return
        groups = epoch_parameters(self._trained(e), self.student, self._is_final_stage(e))
        self._step_sizes = [*groups.get("act_scale", []), *groups.get("weight_scale", [])]
        self._optimizer, self._lr_schedule = epoch_optimizer(groups, self.settings, iters)
        if self._optimizer is not None:
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
        """Continue epoch ``e`` where a checkpoint written inside it left off (the loader resumes at its batch)."""
        state, self._resume_epoch = self._resume_epoch, None
        if state is not None:
            self._iteration = resume_epoch_position(state, e, self.epoch_names, self._optimizer, self._lr_schedule)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self._resume_rng is not None:
            # A mid-epoch checkpoint's RNG state is the one the next step of the uninterrupted run starts from;
            # restored here, after the resumed epoch's data loader was set up.
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        return -1 if self._iteration >= self.epoch_iterations(self.current_epoch) else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        with reducer_off(self.trainer.strategy):
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
            average_gradients(self.trainer.strategy,
                              [p for group in self._optimizer.param_groups for p in group["params"]])
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
        e = self.current_epoch
        name = FINAL_STAGE if self._is_final_stage(e) else self.unit_names[e]
        return epoch_objective(self.settings, self.student, self.teacher, name, unit, self._scheduler, batch,
                               self.trainer.datamodule.conditioning(batch), share, self.manual_backward)

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
        check_ranks_agree(trained, self.all_gather, self.trainer.world_size, self.device, self.epoch_names[e])

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
        e, mid_epoch = self.current_epoch, None
        if self._iteration > 0 and e < len(self.epoch_names) and not self.epoch_done(e):
            # Written inside an epoch (a time-based checkpoint): what its remaining steps need. The optimiser's
            # state is Lightning's own checkpoint["optimizer_states"] (the epoch's Adam is the strategy's).
            mid_epoch = {"epoch": e, "iteration": self._iteration,
                         "lr_schedule": self._lr_schedule.state_dict() if self._lr_schedule is not None else None}
        checkpoint[self.CHECKPOINT_SECTION] = progress_section(self.done_units, self.final_stage_done,
                                                               str(self.trainer.precision), mid_epoch, self.pinned_pretrained)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        state = saved_progress(checkpoint, self.CHECKPOINT_SECTION, self.hparams.pretrained, self.pinned_pretrained)
        restore_hardened_units(self.student, state["done_units"], self.unit_names)
        self.done_units = list(state["done_units"])
        self.final_stage_done = bool(state.get("final_stage_done", False))  # older checkpoints have no stage
        self._resume_epoch = mid_epoch_state(state, checkpoint)
        if self._resume_epoch is None:
            set_rng_state(state["rng"])
        else:
            self._resume_rng = state["rng"]

    def configure_optimizers(self) -> None:
        # One optimiser per epoch, built and registered with the strategy when the epoch begins (_begin_epoch).
        return None

    @classmethod
    def student_from_checkpoint(cls, checkpoint: dict[str, Any], pretrained: str | None = None) -> nn.Module:
        """The calibrated student of a calibration ``checkpoint`` (loaded dict), finalized (uncalibrated units:
        nearest rounding); ``pretrained``: the FP model folder to build it from, when it moved since calibration."""
        hparams = restore_hyperparameters(checkpoint, pretrained)
        try:
            module = cls(**hparams)
        except TypeError as err:  # settings of a BlockReconstruction signature that no longer exists
            raise ValueError(f"the checkpoint's model settings do not fit this accuquant-pl ({err}); it was written "
                             "by an earlier version: evaluate its exported folder, or calibrate again") from err
        with rng_untouched():
            module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module.finalize()

"""The distillation loop: one object owns the student and the critic (DMD2 style), two time scales.

Launch on one process with `collectionlora distill`, or on K with
`torchrun --nproc_per_node=K $(which collectionlora) distill ...` (gloo on CPU, nccl on CUDA).

Per step s (docs/method.md 2.2, paper semantics by default):
  s < anchor_steps:              L_G = TA-FM on an effect batch              -> student AdamW step only
  stream  = PDSR draw (effect with probability p_switch, else general)
  if s % generator_every == 0:   L_G = BS-DMD + [effect] (TS-DMD + TA-FM)  -> student AdamW step
  always:                        L_F = flow matching on a student sample    -> critic AdamW step
Student, critic and teachers are adapters on one shared base; only the student and critic train.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.config import DistillConfig, SamplingConfig
from collectionlora.distill import schedule
from collectionlora.distill.checkpoint import (
    TrainState,
    optimizer_tensors,
    restore_optimizer,
)
from collectionlora.distill.compiled import compiled_transformer, require_compiler
from collectionlora.distill.data import DistillData, EffectSchedule, StepBatch
from collectionlora.distill.losses import add_noise, dmd_loss, flow_matching_loss
from collectionlora.distill.parallel import World, all_ranks_agree, average_gradients
from collectionlora.distill.routing import EFFECT, StreamRouter
from collectionlora.errors import CollectionLoraError, ConfigError
from collectionlora.models.backbone import Backbone, PromptEmbeds

STUDENT = "student"
CRITIC = "critic"


class TrainingDiverged(CollectionLoraError):
    """Too many non-finite losses in a row."""


@dataclass
class Timings:
    """Where a run's time goes (bench_distill.py reads it): seconds in transformer forwards and
    backwards, in the rest of each step, and around the steps (logging, checkpoints)."""

    forward: float = 0.0
    backward: float = 0.0
    total: float = 0.0  # inside step()
    teacher_switch: float = 0.0  # activating the step's teacher (copying its LoRA into a slot)
    data: float = 0.0  # assembling the step's batch (cached latents and prompt states)
    optimizer: float = 0.0  # gradient all-reduce, clipping and the AdamW step
    logging: float = 0.0  # outside step(): metrics to the tracking server and metrics.jsonl
    checkpoint: float = 0.0  # outside step(): writing checkpoints
    compile: float = 0.0  # inside step(): torch.compile of the anchor phase (distill.compile_anchor), once
    forwards: int = 0  # transformer forward calls
    forward_items: int = 0  # items through those forwards (a CFG teacher call counts its two halves)
    backward_items: int = 0  # items of forwards with a gradient (the ones a backward goes through)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Add the block's wall time to the field `name`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) + time.perf_counter() - started)

    def as_dict(self) -> dict[str, float]:
        other = max(self.total - self.forward - self.backward - self.data - self.optimizer - self.compile, 0.0)
        return {
            "time_forward_s": self.forward,
            "time_backward_s": self.backward,
            "time_data_s": self.data,
            "time_optimizer_s": self.optimizer,
            "time_other_s": other,
            "time_total_s": self.total,
            "time_teacher_switch_s": self.teacher_switch,
            "time_logging_s": self.logging,
            "time_checkpoint_s": self.checkpoint,
            "time_compile_s": self.compile,
            "transformer_forwards": self.forwards,
            "transformer_forward_items": self.forward_items,
            "transformer_backward_items": self.backward_items,
        }


@dataclass
class StepLog:
    stream: str
    losses: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


def _repeat(text: PromptEmbeds, times: int) -> PromptEmbeds:
    return PromptEmbeds.stack(text.unpadded() * times)


def _named(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if f".{adapter}." in n}


class Distiller:
    """Student + critic training against lazily switched teachers; `step()` is one iteration."""

    def __init__(
        self,
        backbone: Backbone,
        adapters: AdapterSet,
        config: DistillConfig,
        sampling: SamplingConfig,
        timesteps: list[float],
        data: DistillData,
        effects: EffectSchedule,
        world: World,
        total_steps: int,
    ):
        """`total_steps`: the run's length, the horizon of a decaying learning-rate schedule."""
        self.backbone, self.adapters, self.config, self.sampling = backbone, adapters, config, sampling
        self.timesteps, self.data, self.effects, self.world = timesteps, data, effects, world
        self.total_steps = total_steps
        self.router = StreamRouter(config, world.rank)
        self.student = _named(backbone.transformer, STUDENT)
        self.critic = _named(backbone.transformer, CRITIC)
        if not self.student or not self.critic:
            raise ValueError("add the student and critic adapters before building the Distiller")
        if config.anchor_steps and not config.ta_fm:
            raise ConfigError("distill.anchor_steps: the anchor phase trains TA-FM alone; it needs distill.ta_fm: true")
        if config.batch_size % world.size:
            raise ConfigError(f"distill.batch_size: {config.batch_size} items do not split evenly over {world.size} processes")
        if config.effects_per_batch > config.batch_size:
            raise ConfigError(
                f"distill.effects_per_batch: {config.effects_per_batch} effects do not fit a global batch of {config.batch_size} (distill.batch_size)"
            )
        betas = (0.9, 0.999)
        self.opt_student = torch.optim.AdamW(list(self.student.values()), lr=config.lr, betas=betas, weight_decay=config.weight_decay)
        self.opt_critic = torch.optim.AdamW(list(self.critic.values()), lr=config.critic_lr, betas=betas, weight_decay=config.weight_decay)
        self.state = TrainState()
        self._cached_sample: torch.Tensor | None = None
        self._anchor_model: torch.nn.Module | None = None  # compiled on the first anchor step (compile_anchor)
        if config.compile_anchor and config.anchor_steps:
            require_compiler(backbone.device)
        self.timings = Timings()
        self._device_sync: Callable[[], None] = (
            torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)
        )

    # ---- one iteration --------------------------------------------------------------------------
    def step(self) -> StepLog:
        started = time.perf_counter()
        step, state = self.state.step, self.state
        if step < self.config.anchor_steps:
            log = self._anchor_step(step)
            self.timings.total += time.perf_counter() - started
            return log
        if step == self.config.anchor_steps > 0:
            self._critic_from_student()
        generator_step = step % self.config.generator_every == 0
        reuse = self.config.critic_reuses_generator_sample and not generator_step and self._cached_sample is not None
        if reuse:
            effects = state.cached_effects
            batch = self._batch(state.cached_stream, effects, state.cached_step)
        else:
            stream = self.router.stream(step)
            effects = self._step_effects(stream)
            batch = self._batch(stream, effects, step)
            self._count_batch(stream)
        log = StepLog(stream=batch.stream)
        self._set_learning_rates(step)
        sample = self._cached_sample if reuse else None
        if generator_step:
            losses, sample, ok = self._generator_update(batch, step)
            log.losses.update(losses)
            log.skipped |= not ok
            state.generator_updates += ok
            if self.config.critic_reuses_generator_sample:
                self._cached_sample = sample
                state.cached_step, state.cached_stream, state.cached_effects = step, batch.stream, effects
        critic_loss, ok = self._critic_update(batch, step, sample)
        log.losses["critic_fm"] = critic_loss
        log.skipped |= not ok
        state.critic_updates += ok
        self._advance(batch.stream, log.skipped)
        self._device_sync()
        self.timings.total += time.perf_counter() - started
        return log

    def _anchor_step(self, step: int) -> StepLog:
        """The anchor phase: the student flow-matches the teacher targets of an effect batch (TA-FM alone:
        no simulation, no teacher, no critic): a fraction of an iteration's cost (bench_distill.py)."""
        effects = self._step_effects(EFFECT)
        batch = self._batch(EFFECT, effects, step)
        self._count_batch(EFFECT)
        self._set_learning_rates(step)
        bs_critic_t = schedule.critic_timesteps(schedule.uniform_items(self.config.seed, step, "bs-critic-t", batch.items), 0, schedule.GRID, self.sampling.shift)
        inputs, times, noises = self._ta_fm_draws(batch, step, bs_critic_t)
        copies = len(inputs)
        x_t, t, condition, text = torch.cat(inputs), torch.cat(times), batch.condition.repeat(copies, 1, 1), _repeat(batch.student_text, copies)
        model = None
        if self.config.compile_anchor:
            text = text.padded(self.data.student_text_length)
            model = self._compiled_anchor_model(x_t, t, condition, text)
        velocity = self._velocity(STUDENT, x_t, t, condition, text, model)
        loss = flow_matching_loss(velocity, torch.cat(noises), batch.target.repeat(copies, 1, 1))
        ok = self._update(loss, list(self.student.values()), self.opt_student)
        self.state.anchor_updates += ok
        log = StepLog(stream=EFFECT, losses={"ta_fm": float(loss.detach())}, skipped=not ok)
        self._advance(None, log.skipped)
        self._device_sync()
        return log

    def _compiled_anchor_model(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, text: PromptEmbeds) -> torch.nn.Module:
        """The compiled transformer, built on first use by one throwaway forward and backward of this
        step's shapes, so that the compile is timed on its own and no step's gradients carry it."""
        if self._anchor_model is None:
            with self.timings.measure("compile"):
                model = compiled_transformer(self.backbone.transformer)
                self.adapters.activate(STUDENT)
                self.backbone.velocity(x_t, t / 1000.0, condition, text, model).square().mean().backward()
                for param in self.trainable:
                    param.grad = None
                self._device_sync()
            self._anchor_model = model
        return self._anchor_model

    @torch.no_grad()
    def _critic_from_student(self) -> None:
        """After the anchor phase the critic starts as a copy of the student, not of the base the student
        has left: as in DMD2, where generator and fake score start from the same weights."""
        for name, param in self.critic.items():
            param.copy_(self.student[name.replace(f".{CRITIC}.", f".{STUDENT}.")])

    def _set_learning_rates(self, step: int) -> None:
        """The rates are a pure function of the step, so a resume needs no scheduler state."""
        factor = schedule.lr_factor(self.config.lr_schedule, step, self.total_steps)
        for optimizer, base in ((self.opt_student, self.config.lr), (self.opt_critic, self.config.critic_lr)):
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    def _step_effects(self, stream: str) -> list[str] | None:
        """The next effect-stream step's effects, one per group of the global batch."""
        if stream != EFFECT:
            return None
        groups = self.config.effects_per_batch
        return [self.effects.pick(self.state.effect_batches * groups + g) for g in range(groups)]

    def _batch(self, stream: str, effects: list[str] | None, step: int) -> StepBatch:
        """Effect groups split the global batch into contiguous equal shares (item i -> group i*m//G)."""
        items = self._my_items()
        rows = None
        if effects is not None:
            rows = [effects[item * len(effects) // self.config.batch_size] for item in items]
        with self.timings.measure("data"):
            return self.data.batch(stream, rows, step, self.config.seed, items)

    def _count_batch(self, stream: str) -> None:
        if stream == EFFECT:
            self.state.effect_batches += 1
        else:
            self.state.general_batches += 1

    def _my_items(self) -> list[int]:
        """This rank's slice of the step's global batch (item ids key every per-item draw, so the
        layout of processes does not change what is drawn)."""
        size = self.config.batch_size // self.world.size
        return list(range(self.world.rank * size, (self.world.rank + 1) * size))

    def _advance(self, stream: str | None, skipped: bool) -> None:
        """`stream` None: an anchor step, which no PDSR stream count includes."""
        state = self.state
        state.step += 1
        if stream is not None:
            state.stream_counts[stream] += 1
        if skipped:
            state.nonfinite_skipped += 1
            state.nonfinite_in_a_row += 1
            if state.nonfinite_in_a_row >= self.config.max_nonfinite:
                raise TrainingDiverged(
                    f"distill: {state.nonfinite_in_a_row} non-finite losses in a row at step {state.step} "
                    f"(distill.max_nonfinite={self.config.max_nonfinite}); lower distill.lr / critic_lr"
                )
        else:
            state.nonfinite_in_a_row = 0

    # ---- transformer calls ----------------------------------------------------------------------
    def _velocity(
        self, adapter: str, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, text: PromptEmbeds, model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """`model`: a compiled view of the transformer to run instead of the eager one."""
        self.adapters.activate(adapter)
        self._device_sync()
        started = time.perf_counter()
        velocity = self.backbone.velocity(x_t, t / 1000.0, condition, text, model)
        self._device_sync()
        self.timings.forward += time.perf_counter() - started
        self.timings.forwards += 1
        self.timings.forward_items += x_t.shape[0]
        if torch.is_grad_enabled():
            self.timings.backward_items += x_t.shape[0]
        return velocity

    def _x0(self, adapter: str, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, text: PromptEmbeds) -> torch.Tensor:
        velocity = self._velocity(adapter, x_t, t, condition, text)
        return self.backbone.predict_x0(x_t, t / 1000.0, velocity)

    @torch.no_grad()
    def _teacher_x0(self, batch: StepBatch, x_t: torch.Tensor, t: torch.Tensor, copies: int) -> torch.Tensor:
        """The real score: each row's effect teacher (or the frozen base) with its own prompt and CFG;
        one call per teacher over all of its rows."""
        teachers = batch.teachers * copies
        condition = batch.condition.repeat(copies, 1, 1)
        teacher_text, uncond_text = _repeat(batch.teacher_text, copies), _repeat(batch.uncond_text, copies)
        scale = self.sampling.teacher_cfg_scale
        velocity = torch.empty_like(x_t)
        for teacher in dict.fromkeys(teachers):
            rows = torch.tensor([i for i, name in enumerate(teachers) if name == teacher], device=x_t.device)
            started = time.perf_counter()
            self.adapters.activate(teacher)
            self.timings.teacher_switch += time.perf_counter() - started
            self._device_sync()
            started = time.perf_counter()
            velocity[rows] = self.backbone.guided_velocity(
                x_t[rows], t[rows] / 1000.0, condition[rows], teacher_text.index(rows), uncond_text.index(rows),
                scale, self.sampling.teacher_cfg_norm,
            )
            self._device_sync()
            self.timings.forward += time.perf_counter() - started
            self.timings.forwards += 1
            self.timings.forward_items += len(rows) * (2 if scale != 1.0 else 1)
        return self.backbone.predict_x0(x_t, t / 1000.0, velocity)

    @torch.no_grad()
    def _simulate(self, batch: StepBatch, step: int, purpose: str, index: int) -> torch.Tensor:
        """Backward simulation: unroll the student's sampler from noise to entry `index` of the step
        list, running exactly `index` forwards (none for index 0)."""
        seed, items = self.config.seed, batch.items
        x = schedule.noise_items(seed, step, f"{purpose}-z", items, batch.condition)
        for k in range(index):
            t = torch.full((len(items),), self.timesteps[k], dtype=torch.float64)
            x0 = self._x0(STUDENT, x, t, batch.condition, batch.student_text)
            noise = schedule.noise_items(seed, step, f"{purpose}-eps{k}", items, x)
            x = add_noise(x0, noise, torch.full((len(items),), self.timesteps[k + 1] / 1000.0))
        return x

    def _shared_index(self, step: int, purpose: str) -> int:
        """j ~ U{0..N-1}, one per step for the whole (global) batch like the reference's per-batch draw."""
        u = schedule.uniform_items(self.config.seed, step, purpose, [0])
        return int(schedule.generator_index(u, len(self.timesteps))[0])

    def _step_list_times(self, index: int, count: int) -> torch.Tensor:
        return torch.full((count,), float(self.timesteps[index]), dtype=torch.float64)

    # ---- generator ------------------------------------------------------------------------------
    def _ta_fm_draws(self, batch: StepBatch, step: int, bs_critic_t: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """TA-FM's noisy targets, times and noises: ta_fm_repeats (time, noise) draws per target row."""
        config, seed, items = self.config, self.config.seed, batch.items
        inputs, times, noises = [], [], []
        for repeat in range(config.ta_fm_repeats):
            suffix = f"-{repeat}" if repeat else ""
            u = schedule.uniform_items(seed, step, f"fm-t{suffix}", items)
            fm_t = schedule.ta_fm_timesteps(u, config.ta_fm_timestep, bs_critic_t, self.sampling.shift)
            noises.append(schedule.noise_items(seed, step, f"fm-noise{suffix}", items, batch.target))
            inputs.append(add_noise(batch.target, noises[-1], fm_t / 1000.0))
            times.append(fm_t)
        return inputs, times, noises

    def _generator_update(self, batch: StepBatch, step: int) -> tuple[dict[str, float], torch.Tensor, bool]:
        config, seed, items = self.config, self.config.seed, batch.items
        shift = self.sampling.shift

        def uniform(purpose: str) -> torch.Tensor:
            return schedule.uniform_items(seed, step, purpose, items)

        index = self._shared_index(step, "bs-index")
        inputs = [self._simulate(batch, step, "bs", index)]
        times = [self._step_list_times(index, len(items))]
        bs_critic_t = schedule.critic_timesteps(uniform("bs-critic-t"), 0, schedule.GRID, shift)
        use_ts = batch.stream == EFFECT and config.ts
        use_fm = batch.stream == EFFECT and config.ta_fm
        if use_ts:
            ts_t = schedule.ts_generator_timesteps(uniform("ts-t"), self.timesteps, config.ts_generator_last)
            inputs.append(add_noise(batch.target, schedule.noise_items(seed, step, "ts-noise", items, batch.target), ts_t / 1000.0))
            times.append(ts_t)
        fm_noises = []
        if use_fm:
            fm_inputs, fm_times, fm_noises = self._ta_fm_draws(batch, step, bs_critic_t)
            inputs += fm_inputs
            times += fm_times

        # One student forward with gradient for every generator term (BS, TS, TA-FM).
        copies = len(inputs)
        x_in, t_in = torch.cat(inputs), torch.cat(times)
        velocity = self._velocity(STUDENT, x_in, t_in, batch.condition.repeat(copies, 1, 1), _repeat(batch.student_text, copies))
        x0 = self.backbone.predict_x0(x_in, t_in / 1000.0, velocity)
        x0_parts, v_parts = x0.chunk(copies), velocity.chunk(copies)

        # The DMD directions of the BS (and TS) samples: critic and teacher, no gradient.
        dmd_samples = [x0_parts[0]] + ([x0_parts[1]] if use_ts else [])
        dmd_times = [bs_critic_t]
        if use_ts:
            low, high = config.ts_critic_range
            dmd_times.append(schedule.critic_timesteps(uniform("ts-critic-t"), low, high, shift))
        purposes = ["bs-dmd-noise", "ts-dmd-noise"][: len(dmd_samples)]
        with torch.no_grad():
            clean = torch.cat([s.detach() for s in dmd_samples])
            noise = torch.cat([schedule.noise_items(seed, step, p, items, clean) for p in purposes])
            critic_t = torch.cat(dmd_times)
            noisy = add_noise(clean, noise, critic_t / 1000.0)
            fake = self._x0(CRITIC, noisy, critic_t, batch.condition.repeat(len(dmd_samples), 1, 1), _repeat(batch.student_text, len(dmd_samples)))
            real = self._teacher_x0(batch, noisy, critic_t, len(dmd_samples))
        fake_parts, real_parts = fake.chunk(len(dmd_samples)), real.chunk(len(dmd_samples))

        terms = {"dmd_bs": dmd_loss(x0_parts[0], fake_parts[0], real_parts[0])}
        total = config.bs_weight * terms["dmd_bs"]
        if use_ts:
            terms["dmd_ts"] = dmd_loss(x0_parts[1], fake_parts[1], real_parts[1])
            total = total + config.ts_weight * terms["dmd_ts"]
        if use_fm:
            repeats = len(fm_noises)
            fm_velocity = torch.cat(v_parts[-repeats:])
            terms["ta_fm"] = flow_matching_loss(fm_velocity, torch.cat(fm_noises), batch.target.repeat(repeats, 1, 1))
            total = total + config.ta_fm_weight * terms["ta_fm"]
        ok = self._update(total, list(self.student.values()), self.opt_student)
        losses = {name: float(value.detach()) for name, value in terms.items()}
        losses["generator"] = float(total.detach())
        return losses, x0_parts[0].detach(), ok

    # ---- critic ---------------------------------------------------------------------------------
    def _critic_update(self, batch: StepBatch, step: int, sample: torch.Tensor | None) -> tuple[float, bool]:
        seed, items = self.config.seed, batch.items
        if sample is None:  # a fresh backward-simulated student sample
            with torch.no_grad():
                index = self._shared_index(step, "critic-index")
                x_t = self._simulate(batch, step, "critic", index)
                sample = self._x0(STUDENT, x_t, self._step_list_times(index, len(items)), batch.condition, batch.student_text)
        t = schedule.critic_timesteps(schedule.uniform_items(seed, step, "critic-t", items), 0, schedule.GRID, self.sampling.shift)
        noise = schedule.noise_items(seed, step, "critic-noise", items, sample)
        velocity = self._velocity(CRITIC, add_noise(sample, noise, t / 1000.0), t, batch.condition, batch.student_text)
        loss = flow_matching_loss(velocity, noise, sample)
        ok = self._update(loss, list(self.critic.values()), self.opt_critic)
        return float(loss.detach()), ok

    # ---- optimisation ---------------------------------------------------------------------------
    def _update(self, loss: torch.Tensor, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
        """Backward, average over ranks, clip, step; skipped on every rank if any rank's loss or
        gradient norm is non-finite."""
        finite = bool(torch.isfinite(loss.detach()))
        if finite:
            self._device_sync()
            started = time.perf_counter()
            loss.backward()
            self._device_sync()
            self.timings.backward += time.perf_counter() - started
        with self.timings.measure("optimizer"):
            ok = all_ranks_agree(finite, self.world, str(self.backbone.device))
            if ok:
                average_gradients(parameters, self.world)
                norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
                ok = bool(torch.isfinite(norm))
                if ok:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return ok

    # ---- state ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint holds as tensors: both LoRAs, both AdamW states, the torch RNG."""
        out = {f"student/{n}": p.detach().cpu().clone() for n, p in self.student.items()}
        out.update({f"critic/{n}": p.detach().cpu().clone() for n, p in self.critic.items()})
        out.update(optimizer_tensors("opt_student", self.opt_student, list(self.student)))
        out.update(optimizer_tensors("opt_critic", self.opt_critic, list(self.critic)))
        out["rng/torch_cpu"] = torch.get_rng_state()
        if self._cached_sample is not None:
            out["cache/sample"] = self._cached_sample.detach().cpu().clone()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], with_optimizers: bool = True) -> None:
        with torch.no_grad():
            for prefix, named in (("student", self.student), ("critic", self.critic)):
                for name, param in named.items():
                    key = f"{prefix}/{name}"
                    if key not in tensors:
                        raise KeyError(f"checkpoint has no tensor {key}")
                    param.copy_(tensors[key])
        if with_optimizers:
            restore_optimizer("opt_student", self.opt_student, list(self.student), tensors)
            restore_optimizer("opt_critic", self.opt_critic, list(self.critic), tensors)
            torch.set_rng_state(tensors["rng/torch_cpu"])
            if "cache/sample" in tensors:
                self._cached_sample = tensors["cache/sample"].to(self.backbone.device, self.backbone.dtype)

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in [*self.student.values(), *self.critic.values()])

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [*self.student.values(), *self.critic.values()]


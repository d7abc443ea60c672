"""Samplers: step lists, NFE accounting, seeding and batch independence."""

from __future__ import annotations

import pytest
import torch

from collectionlora.effects import make_sources
from collectionlora.sampling import (
    sample_student,
    sample_teacher,
    shift_timestep,
    student_timesteps,
    teacher_sigmas,
)

PROMPT = "Convert the photo to black and white"


def test_reference_step_list_is_the_shift3_warp_of_a_uniform_grid(tiny_params):
    config = tiny_params.sampling
    assert student_timesteps(config) == [1000.0, 954.0, 900.0, 833.0, 750.0, 642.0, 500.0, 300.0]
    warped = [float(shift_timestep(1000 * (1 - k / 8), 3.0)) for k in range(8)]
    assert warped == pytest.approx(config.student_timesteps, abs=1e-3)
    assert student_timesteps(config, 4) == [1000.0, 900.0, 750.0, 500.0]
    assert student_timesteps(config, 1) == [1000.0]
    exact = config.model_copy(update={"truncate_timesteps": False})
    assert student_timesteps(exact)[1] == pytest.approx(954.5454)


def test_teacher_sigmas_run_from_one_to_zero_and_shift_towards_noise():
    sigmas = teacher_sigmas(10, 3.0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 11
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert torch.all(sigmas[1:-1] > teacher_sigmas(10, 1.0)[1:-1])


def test_nfe_counts(backbone, tiny_params):
    sources = make_sources("eval", 2, 32, 0)
    with_cfg = sample_teacher(backbone, sources, [PROMPT] * 2, [0, 1], tiny_params.sampling, steps=3)
    no_cfg = sample_teacher(backbone, sources, [PROMPT] * 2, [0, 1], tiny_params.sampling, steps=3, cfg_scale=1.0)
    student = sample_student(backbone, sources, [PROMPT] * 2, [0, 1], student_timesteps(tiny_params.sampling))
    assert (with_cfg.nfe, no_cfg.nfe, student.nfe) == (6, 3, 8)


def test_forward_count_matches_nfe(backbone, tiny_params):
    calls = []
    def count(module, args, kwargs):
        calls.append(kwargs["hidden_states"].shape[0])

    handle = backbone.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        sources = make_sources("eval", 3, 32, 0)
        out = sample_teacher(backbone, sources, [PROMPT] * 3, [0, 1, 2], tiny_params.sampling, steps=2)
    finally:
        handle.remove()
    # CFG batches cond and uncond into one forward of 2B rows: NFE per image = rows / B.
    assert sum(calls) / 3 == out.nfe == 4


@pytest.mark.parametrize("sampler", ["teacher", "student"])
def test_seeded_deterministic_and_batch_independent(backbone, tiny_params, sampler):
    sources = make_sources("eval", 3, 32, 0)

    def run(src, seeds):
        if sampler == "teacher":
            return sample_teacher(backbone, src, [PROMPT] * len(src), seeds, tiny_params.sampling, steps=3).images
        return sample_student(backbone, src, [PROMPT] * len(src), seeds, [1000.0, 750.0, 500.0]).images

    first = run(sources, [10, 11, 12])
    assert torch.equal(first, run(sources, [10, 11, 12]))
    assert not torch.allclose(first, run(sources, [20, 21, 22]))
    alone = run(sources[1:2], [11])
    assert torch.allclose(alone[0], first[1], atol=1e-5)

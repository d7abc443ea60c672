"""Each C2F-DO loss term and timestep draw on inputs with known answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from collectionlora.distill import schedule
from collectionlora.distill.losses import (
    add_noise,
    dmd_gradient,
    dmd_loss,
    flow_matching_loss,
)
from collectionlora.sampling import shift_timestep


def test_add_noise_interpolates_per_item():
    x0, noise = torch.zeros(3, 4, 2), torch.ones(3, 4, 2)
    x_t = add_noise(x0, noise, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.allclose(x_t[1], torch.full((4, 2), 0.25)) and torch.equal(x_t[2], noise[2])


def test_dmd_gradient_is_score_difference_over_the_reference_normaliser():
    x = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]])
    real = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    fake = torch.tensor([[[1.0, 1.0]], [[0.0, 4.0]]])
    # item 0: w = mean(|1-0|, |3-1|) = 1.5; g = (fake - real) / w = [1, 0] / 1.5
    # item 1: w = 2; g = [-2, 2] / 2
    expected = torch.tensor([[[1 / 1.5, 0.0]], [[-1.0, 1.0]]], dtype=torch.float64)
    assert torch.allclose(dmd_gradient(x, fake, real), expected)


def test_dmd_loss_gradient_is_g_over_numel_and_value_is_half_mean_square():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=generator, requires_grad=True)
    fake, real = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    loss = dmd_loss(x, fake, real)
    loss.backward()
    g = dmd_gradient(x, fake, real)
    assert loss.dtype == torch.float64
    assert torch.allclose(x.grad.double(), g / x.numel(), atol=1e-12)
    assert torch.isclose(loss, 0.5 * (g**2).mean())


def test_dmd_gradient_zero_when_critic_equals_teacher():
    x = torch.randn(2, 4, 3)
    same = torch.randn(2, 4, 3)
    assert torch.count_nonzero(dmd_gradient(x, same, same)) == 0


def test_dmd_gradient_maps_non_finite_to_zero_like_the_reference():
    x = torch.zeros(1, 2, 1)
    real = torch.zeros(1, 2, 1)  # normaliser 0 -> division by zero
    fake = torch.tensor([[[1.0], [0.0]]])
    g = dmd_gradient(x, fake, real)
    assert torch.isfinite(g).all()


def test_flow_matching_loss_is_zero_at_the_true_velocity_and_quadratic_off_it():
    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert flow_matching_loss(noise - x0, noise, x0) == 0
    assert torch.isclose(flow_matching_loss(noise - x0 + 0.5, noise, x0), torch.tensor(0.25))


def test_flow_matching_loss_equals_the_reference_x0_form():
    """mean(((x_t - x0_pred)/sigma - (noise - x0))^2) with x0_pred = x_t - sigma v is our velocity form."""
    generator = torch.Generator().manual_seed(1)
    x0, noise, v = (torch.randn(3, 4, 2, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = add_noise(x0, noise, sigma)
    x0_pred = x_t - sigma.view(-1, 1, 1) * v
    reference = torch.mean(((x_t - x0_pred) / sigma.view(-1, 1, 1) - (noise - x0)) ** 2)
    assert torch.isclose(flow_matching_loss(v, noise, x0), reference, atol=1e-6)


def test_critic_timesteps_respect_the_pre_shift_bounds():
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    bs = schedule.critic_timesteps(u, 0, 1000, 3.0)
    ts = schedule.critic_timesteps(u, 500, 1000, 3.0)
    assert bs.min() >= 1 and bs.max() <= 1000
    assert ts.min() == pytest.approx(750.0)  # S(500) with shift 3: the paper's tau_min = 500 pre-shift
    assert ts.max() < 1000


def test_ts_generator_time_is_one_of_the_last_entries():
    steps = [1000, 954, 900, 833, 750, 642, 500, 300]
    drawn = schedule.ts_generator_timesteps(torch.linspace(0, 1, 500, dtype=torch.float64), steps, 5)
    assert set(drawn.tolist()) == {833.0, 750.0, 642.0, 500.0, 300.0}


def test_ta_fm_reference_mode_is_bounded_below_by_the_bs_time_and_shifted_twice():
    u = torch.linspace(0, 1, 200, dtype=torch.float64)
    bs = torch.full((200,), 900.0)
    reference = schedule.ta_fm_timesteps(u, "reference", bs, 3.0)
    assert reference.min() >= float(shift_timestep(900.0, 3.0)) - 1e-9
    paper = schedule.ta_fm_timesteps(u, "paper", bs, 3.0)
    assert paper.min() < 100  # the paper's draw ignores the BS time


def test_generator_index_is_uniform_over_the_step_list():
    u = schedule.uniform_items(0, 0, "index", list(range(8000)))
    counts = torch.bincount(schedule.generator_index(u, 8), minlength=8).double()
    assert counts.min() > 0.9 * 1000 and counts.max() < 1.1 * 1000


def test_per_item_draws_do_not_depend_on_the_batch_they_are_in():
    whole = schedule.uniform_items(3, 7, "x", [0, 1, 2, 3])
    assert torch.equal(whole[2:], schedule.uniform_items(3, 7, "x", [2, 3]))
    like = torch.zeros(4, 6, 2)
    assert torch.equal(schedule.noise_items(3, 7, "n", [0, 1, 2, 3], like)[1], schedule.noise_items(3, 7, "n", [1], like[:1])[0])
    assert not torch.equal(schedule.uniform_items(3, 8, "x", [0]), schedule.uniform_items(3, 7, "x", [0]))


def test_learning_rate_factor_is_constant_or_a_cosine_to_zero():
    assert [schedule.lr_factor("constant", s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    cosine = [schedule.lr_factor("cosine", s, 10) for s in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert all(a > b for a, b in itertools.pairwise(cosine))
    with pytest.raises(ValueError, match="linear"):
        schedule.lr_factor("linear", 0, 10)

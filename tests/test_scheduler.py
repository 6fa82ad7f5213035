"""The FLUX.2 schedule against the reference values (docs/diffsynth-aaa.md section 2) and the
reference scheduler itself."""

import pytest
import torch

from aaa_core.errors import InputError
from aaa_core.scheduler import TrainingSchedule, empirical_mu, flux2_sigmas, sigmas_to_timesteps

# Section 2.1 of docs/diffsynth-aaa.md: 256x256 (L=256), 30 steps.
REFERENCE_256_30 = [
    1.0, 0.99417, 0.98799, 0.98145, 0.97449, 0.96709, 0.95920, 0.95077, 0.94174, 0.93204,
    0.92160, 0.91033, 0.89813, 0.88487, 0.87042, 0.85460, 0.83721, 0.81801, 0.79668, 0.77287,
    0.74612, 0.71583, 0.68126, 0.64143, 0.59505, 0.54034, 0.47486, 0.39507, 0.29569, 0.16852,
]


def test_empirical_mu_matches_documented_examples():
    assert empirical_mu(256, 30) == pytest.approx(1.771155, abs=1e-6)
    assert empirical_mu(256, 50) == pytest.approx(1.621607, abs=1e-6)
    assert empirical_mu(4096, 30) == pytest.approx(2.139798, abs=1e-6)
    # Above 4300 tokens mu no longer depends on the step count.
    assert empirical_mu(5000, 10) == empirical_mu(5000, 50)


def test_256px_30_step_sigmas_match_reference_table():
    sigmas = flux2_sigmas(30, image_seq_len=256)
    assert sigmas.dtype == torch.float32
    assert sigmas.shape == (30,)
    torch.testing.assert_close(sigmas, torch.tensor(REFERENCE_256_30), atol=6e-6, rtol=0)


@pytest.mark.parametrize("steps,denoise,seq_len", [(30, 1.0, 256), (50, 1.0, 256), (30, 0.6, 256), (20, 0.35, 1024), (7, 1.0, 5000), (1000, 1.0, None)])
def test_sigmas_equal_reference_scheduler_bit_for_bit(steps, denoise, seq_len):
    from diffsynth.diffusion import FlowMatchScheduler

    reference = FlowMatchScheduler("FLUX.2")
    reference.set_timesteps(steps, denoising_strength=denoise, dynamic_shift_len=seq_len)
    ours = flux2_sigmas(steps, denoise, seq_len)
    assert torch.equal(ours, reference.sigmas)
    assert torch.equal(sigmas_to_timesteps(ours), reference.timesteps)


def test_training_grid_and_weights_match_reference():
    from diffsynth.diffusion import FlowMatchScheduler

    reference = FlowMatchScheduler("FLUX.2")
    reference.set_timesteps(1000, training=True)
    schedule = TrainingSchedule.flux2()
    assert torch.equal(schedule.sigmas, reference.sigmas)
    torch.testing.assert_close(schedule.weights, reference.linear_timesteps_weights, atol=1e-6, rtol=0)
    # Documented properties (section 2.3).
    assert schedule.weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert schedule.weights[0].item() == 0.0
    assert schedule.weights.max().item() == pytest.approx(1.6926, abs=1e-3)
    assert schedule.weights[-1].item() == pytest.approx(0.0116, abs=1e-3)
    assert schedule.sigmas[-1].item() == pytest.approx(0.0022228, abs=1e-6)


def test_nearest_index_matches_reference_lookup_including_bf16_rounding():
    from diffsynth.diffusion import FlowMatchScheduler

    reference = FlowMatchScheduler("FLUX.2")
    reference.set_timesteps(1000, training=True)
    schedule = TrainingSchedule.flux2()
    t = schedule.timesteps[torch.tensor([0, 3, 4, 5, 250, 500, 999])].to(torch.bfloat16)
    ours = schedule.nearest_index(t)
    expected = torch.stack([torch.argmin((reference.timesteps - ti.float()).abs()) for ti in t])
    assert torch.equal(ours, expected)
    # Indices 0-4 all round to t=1000 in bf16 and map to sigma 1 (section 3, step 4).
    assert ours[:3].tolist() == [0, 0, 0]


def test_bad_schedule_arguments_raise():
    with pytest.raises(InputError, match="steps must be at least 1"):
        flux2_sigmas(0)
    with pytest.raises(InputError, match="denoise"):
        flux2_sigmas(10, denoise=0.0)

"""Flow-matching sampling (FramePack section 5): sigma schedules, samplers and guidance.

Independent of the network: a model is any callable `model(x, sigma_vec) -> x0`.
"""

from .guidance import cfg_velocity, velocity_to_x0, x0_to_velocity
from .samplers import SAMPLERS, Callback, Cancelled, Model, Sampler, euler, get_sampler, unipc
from .sigmas import MU_MAX, dynamic_mu, flow_shift, noisy_tokens, sigma_schedule

__all__ = [
    "MU_MAX",
    "SAMPLERS",
    "Callback",
    "Cancelled",
    "Model",
    "Sampler",
    "cfg_velocity",
    "dynamic_mu",
    "euler",
    "flow_shift",
    "get_sampler",
    "noisy_tokens",
    "sigma_schedule",
    "unipc",
    "velocity_to_x0",
    "x0_to_velocity",
]

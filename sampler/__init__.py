"""Semi-autoregressive block diffusion with remasking: parameters, the
per-step commit schedule, remasking strategies, the batched denoising step
and the reference sampler it is tested against. Never imports ``server``."""

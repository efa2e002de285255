"""vaelab: train, sample, evaluate and compare VAEs (VAE, beta-VAE, CVAE) and a DDPM baseline."""

__version__ = "0.1.0"

"""The metrics of ``vaelab evaluate``, one module per concern; ``vaelab.evaluation`` orchestrates them.

- ``features``: feature spaces (evaluator classifier, FID Inception-v3) for FID/KID.
- ``distances``: FID and KID between feature sets, with train-vs-test floors and per-class FID.
- ``confidence``: the evaluator's confidence and class balance on generated images.
- ``likelihood``: negative ELBO and the IWAE bound of test images (VAEs).
- ``reconstruction``: MSE / PSNR / SSIM of test reconstructions (VAEs).
- ``latent``: active units, KL per dimension, posterior collapse (VAEs).
- ``speed``: generation time, one definition for evaluate and compare.
"""

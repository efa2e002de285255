"""The metrics of ``vaelab evaluate``, one module per concern; ``vaelab.evaluation`` orchestrates them.

- ``features``: feature spaces for FID/KID (the evaluator classifier) and feature extraction.
- ``inception``: the FID Inception-v3, offline: weights located and checked, pytorch-fid's preprocessing.
- ``reference``: cached statistics of real images (test split, floors) per feature space.
- ``distances``: FID and KID between feature sets, with train-vs-test floors and per-class FID.
- ``manifold``: improved precision/recall and density/coverage (k-nearest-neighbour balls).
- ``confidence``: the evaluator's confidence and class balance on generated images.
- ``likelihood``: negative ELBO and the IWAE bound of test images (VAEs).
- ``reconstruction``: MSE / PSNR / SSIM of test reconstructions (VAEs).
- ``latent``: active units, KL per dimension, posterior collapse (VAEs).
- ``speed``: generation time, one definition for evaluate and compare.
- ``disentanglement``: MIG and DCI of the latent code against known generative factors.
"""

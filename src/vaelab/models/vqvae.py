"""VQ-VAE with an exponential-moving-average codebook (van den Oord, Vinyals & Kavukcuoglu 2017, "Neural
Discrete Representation Learning"); its config sits beside it.

The encoder is ``ConvVAE``'s conv stack (no fully connected layers) followed by a 1x1 conv to
``latent_dim`` channels: a grid ``z_e(x)`` of ``h x w`` vectors, each replaced by its nearest of ``num_codes``
codebook vectors ``e_k`` (eq. 1-2), ``z_q = e_{argmin_k ||z_e - e_k||}``. The decoder (a 1x1 conv, then
``ConvVAE``'s transposed convs) reads ``z_q``; its gradient is copied to ``z_e`` (the straight-through
estimator, sec. 3.2). The objective per image (eq. 3, without the codebook term):

    loss = -log p(x | z_q) + beta * commitment * ||z_e - sg[z_q]||^2

(``commitment``: the paper's beta, 0.25; the run's ``--beta`` multiplies it, 1 by default). The codebook is not
learned by gradient but by exponential moving averages (appendix A.1, eqs. 6-8), in training mode, per batch:

    N_k <- gamma N_k + (1 - gamma) n_k,    m_k <- gamma m_k + (1 - gamma) sum_{j: k_j = k} z_e,j,    e_k = m_k / N_k

with ``n_k`` the batch's vectors assigned to ``k``, ``gamma = ema_decay`` and ``N`` Laplace-smoothed
(``(N_k + eps) / (sum N + K eps) * sum N``, as in the authors' Sonnet code) so that an unused code never divides
by 0. The codebook starts at ``num_codes`` encoder vectors of the first training batch (drawn with
replacement), so that every code starts where the data is. Under ``torchrun`` the counts and sums are summed
over the processes before the update, so every process keeps the same codebook.

The code is discrete, so there is no KL, ELBO or likelihood bound (``HAS_ELBO = False``; ``vaelab evaluate``
skips ``nll`` and ``latent``). Training assumes a uniform prior over the codes (sec. 3.1); samples come from
a prior fitted after training: the default sampler ``pixelcnn`` (``vaelab.models.pixelcnn``,
``vaelab.latent_priors``), an autoregressive model of the code grid of the training images.

For the rest of the toolkit a code is the flattened grid: ``encode`` gives ``z_q`` as ``(B, latent_dim * h * w)``
(``(B, latent_dim, h, w)`` flattened; ``logvar`` a constant point mass), ``decode`` snaps every vector of a code to
its nearest codebook vector first, so fitted samplers over those codes (``gmm``) decode to codebook grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import ConfigError
from vaelab.losses import LossOutput
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig

DETERMINISTIC_LOGVAR = -30.0  # a point mass, as the RAE's
LAPLACE_EPS = 1e-5


@dataclass
class VQVAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` (``latent_dim``: the size of each code vector; ``fc_hidden`` unused: the code is the
    feature map of the ``len(channels)`` stride-2 convs, ``image_size / 2**len(channels)`` per side) plus the codebook.

    Attributes:
        num_codes: ``K``, codebook vectors (at least 2; the paper: 512).
        commitment: weight of ``||z_e - sg[z_q]||^2`` (the paper's beta, 0.25; >= 0).
        ema_decay: ``gamma`` of the codebook's moving averages (in [0, 1); the paper: 0.99).
    """

    num_codes: int = 512
    commitment: float = 0.25
    ema_decay: float = 0.99
    model_type: str = field(default="vqvae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_codes, int) or isinstance(self.num_codes, bool) or self.num_codes < 2:
            raise ConfigError(f"num_codes must be an integer >= 2 (codebook size), got {self.num_codes!r}")
        if isinstance(self.commitment, bool) or not isinstance(self.commitment, (int, float)) or self.commitment < 0:
            raise ConfigError(f"commitment must be a non-negative number, got {self.commitment!r}")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be a number in [0, 1), got {self.ema_decay!r}")


def ema_update(count: torch.Tensor, total: torch.Tensor, codes: torch.Tensor, assign: torch.Tensor,
               vectors: torch.Tensor, decay: float) -> None:
    """One EMA codebook step in place (van den Oord et al. 2017, eqs. 6-8, with Laplace smoothing).

    Args:
        count: ``(K,)`` float32 ``N_k``; total: ``(K, D)`` float32 ``m_k``; codes: ``(K, D)`` the codebook ``e_k``.
        assign: ``(M,)`` int64 code of each vector; vectors: ``(M, D)`` the encoder outputs ``z_e``.
        decay: ``gamma`` in [0, 1).
    """
    onehot = F.one_hot(assign, len(codes)).float()  # (M, K)
    with torch.autocast(vectors.device.type, enabled=False):  # the sums in float32 also under mixed precision
        n, sums = onehot.sum(0), onehot.T @ vectors.float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        torch.distributed.all_reduce(sums)
    count.mul_(decay).add_(n, alpha=1 - decay)
    total.mul_(decay).add_(sums, alpha=1 - decay)
    size = count.sum()
    smoothed = (count + LAPLACE_EPS) / (size + len(codes) * LAPLACE_EPS) * size
    codes.copy_(total / smoothed[:, None])


class VQVAE(ConvVAE):
    """VQ-VAE over ``ConvVAE``'s conv stacks with an EMA codebook.

    Shapes: images ``(B, C, H, W)``; the grid ``(B, latent_dim, h, w)``; codes (``encode``, ``decode``) flattened
    ``(B, latent_dim * h * w)``; code indices ``(B, h, w)`` int64 in ``0..num_codes-1``.
    """

    HAS_ELBO = False
    DEFAULT_SAMPLER = "pixelcnn"
    EXTRA_TERMS = {"commit": "||z_e - sg[z_q]||^2 summed over the code grid (van den Oord et al. 2017, eq. 3), per image",
                   "perplexity": "exp(entropy) of the batch's code usage (1: one code used; K: all used evenly), the "
                                 "batch's value for each of its images"}
    NOT_APPLICABLE = {
        "nll": "a VQ-VAE has a discrete deterministic code and no ELBO: no IWAE bound",
        "latent": "a VQ-VAE's code is discrete: no KL per dimension; active units are in summary.json",
    }

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        ch, d = config.channels, config.latent_dim
        flat = next(i for i, m in enumerate(self.encoder) if isinstance(m, nn.Flatten))
        self.encoder = nn.Sequential(*list(self.encoder)[:flat])  # the conv stack alone
        del self.fc_mu, self.fc_logvar, self.decoder_input
        self.pre_quant = nn.Conv2d(ch[-1], d, 1)
        self.post_quant = nn.Conv2d(d, ch[-1], 1)
        self.grid = self.feature_shape[1:]
        self.register_buffer("codebook", torch.randn(config.num_codes, d))
        self.register_buffer("ema_count", torch.ones(config.num_codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._checked_init = False  # whether `initialised` was read once in training (one host sync, not per step)

    @property
    def PRIOR(self) -> str:  # noqa: N802 - the contract's name
        return (f"uniform over the {self.config.num_codes} codebook vectors at each of the {self.grid[0]}x{self.grid[1]} "
                "grid cells (what training assumes, not a sampler to judge; the default sampler is the fitted PixelCNN)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The code grid ``(latent_dim, h, w)``; codes travel flattened to ``latent_dim * h * w`` numbers."""
        return (self.config.latent_dim, *self.grid)

    # ------------------------------------------------------------------ the code grid

    def encode_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``z_e(x)``: ``(B, C, H, W)`` -> ``(B, latent_dim, h, w)``."""
        return self.pre_quant(self.encoder(x))

    def nearest(self, grid: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` -> ``(B, h, w)`` int64: the index of each vector's nearest codebook vector (squared
        Euclidean distance)."""
        flat = grid.float().permute(0, 2, 3, 1).reshape(-1, grid.shape[1])
        with torch.autocast(flat.device.type, enabled=False):  # distances in float32 also under mixed precision
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)[None]
        return dist.argmin(1).view(grid.shape[0], *grid.shape[2:])

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, h, w)`` -> the grid of their codebook vectors ``(B, latent_dim, h, w)`` float32."""
        return self.codebook[idx].permute(0, 3, 1, 2)

    def code_indices(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """The code grid of images ``x``: ``(B, h, w)`` int64 (``y`` ignored). A fitted prior over the grid
        (``--sampler pixelcnn``) is trained on these."""
        return self.nearest(self.encode_grid(x))

    def codes_to_z(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, h, w)`` -> flattened codes ``(B, latent_dim * h * w)`` (what ``decode`` takes)."""
        return self.embed(idx).flatten(1)

    def decode_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim, h, w)`` -> decoder logits ``(B, C, H, W)`` (as ``ConvVAE.decode_logits``)."""
        return self._with_log_sigma(self.decoder(self.post_quant(grid)))

    # ------------------------------------------------------------------ the VAE family's contract

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q, logvar)``: the quantised grid flattened, ``(B, latent_dim * h * w)``, and a constant
        ``DETERMINISTIC_LOGVAR`` of the same shape (``y`` ignored)."""
        z = self.codes_to_z(self.code_indices(x))
        return z, torch.full_like(z, DETERMINISTIC_LOGVAR)

    def decode_logits(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """Flattened codes ``(B, latent_dim * h * w)`` -> decoder logits; every vector is first snapped to its
        nearest codebook vector (``y`` ignored)."""
        grid = z.view(len(z), self.config.latent_dim, *self.grid)
        return self.decode_grid(self.embed(self.nearest(grid)))

    def importance_samples(self, x: torch.Tensor, k: int, *, y: torch.Tensor | None = None,
                           generator: torch.Generator | None = None):
        """Not available: a VQ-VAE has no posterior density (``nll`` is not applicable).

        Raises:
            ConfigError: always.
        """
        raise ConfigError("a VQ-VAE has no posterior density: no importance weights or IWAE bound")

    def log_prior(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z)`` of the uniform prior over the codebook grids: ``-h*w*log K`` for every code ``(B,)``."""
        return torch.full((len(z),), -self.grid[0] * self.grid[1] * math.log(self.config.num_codes), device=z.device)

    @torch.no_grad()
    def sample_prior(self, n: int, *, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes with uniform independent indices (the training prior; not the default sampler):
        ``(n, latent_dim * h * w)`` float32 on the model's device."""
        device = self.codebook.device
        gen_device = generator.device if generator is not None else device
        idx = torch.randint(self.config.num_codes, (n, *self.grid), device=gen_device, generator=generator)
        return self.codes_to_z(idx.to(device))

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """No noise (a deterministic code): ``{}``."""
        return {}

    @torch.no_grad()
    def _init_codebook(self, vectors: torch.Tensor) -> None:
        """Start the codebook at ``num_codes`` of the batch's encoder vectors (with replacement, drawn with the
        global torch generator; rank 0's under ``torchrun``)."""
        pick = torch.randint(len(vectors), (self.config.num_codes,), device=vectors.device)
        self.codebook.copy_(vectors[pick])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook, 0)  # every process starts from rank 0's codebook
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """``recon + beta * commitment * ||z_e - sg[z_q]||^2`` per image, mean over the batch (van den Oord et al.
        2017, eq. 3; the codebook term replaced by the EMA update). ``noise``/``generator`` are unused.

        Steps: 1. ``z_e = encoder(x)``; 2. (training mode) the codebook's first batch starts it; 3. nearest codes,
        ``z_q``; 4. (training mode) the EMA update of the codebook from this batch; 5. decode the straight-through
        grid ``z_e + sg[z_q - z_e]``, recon NLL; 6. the commitment term and the objective. ``kl`` is 0 (no KL).
        """
        cfg = self.config
        z_e = self.encode_grid(x).float()
        vectors = z_e.detach().permute(0, 2, 3, 1).reshape(-1, cfg.latent_dim)
        if self.training and not self._checked_init:
            if not bool(self.initialised):
                self._init_codebook(vectors)
            self._checked_init = True
        idx = self.nearest(z_e)
        if self.training:
            with torch.no_grad():
                ema_update(self.ema_count, self.ema_sum, self.codebook, idx.flatten(), vectors, cfg.ema_decay)
        z_q = self.embed(idx)
        z_st = z_e + (z_q - z_e).detach()  # straight-through: the decoder's gradient reaches the encoder
        recon, mse = self.recon_terms(x, self.decode_grid(z_st))
        commit = (z_e - z_q.detach()).pow(2).flatten(1).sum(1)
        usage = F.one_hot(idx.flatten(), cfg.num_codes).float().mean(0)
        perplexity = torch.exp(-(usage * (usage + 1e-10).log()).sum()).expand(len(x))
        objective = recon + beta * cfg.commitment * commit
        z = z_q.flatten(1)
        return LossOutput(loss=objective.mean(), recon=recon, kl=torch.zeros_like(recon), mse=mse, mu=z,
                          logvar=torch.full_like(z, DETERMINISTIC_LOGVAR), objective=objective,
                          extra={"commit": commit, "perplexity": perplexity})

"""A small PixelCNN over a grid of discrete codes (van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel
Recurrent Neural Networks", sec. 3.5): the learned prior of a VQ-VAE's code grid (van den Oord et al. 2017,
sec. 3.2 and 4), fitted after the VQ-VAE on the codes of its training images (``vaelab.latent_priors``,
sampler ``pixelcnn``).

    p(k) = prod_{i, j in raster order} p(k_ij | k_<ij)

Masked convolutions keep the raster order: the first layer (mask ``A``) sees only the cells before the current
one, the later ones (mask ``B``) also the current cell of the layer below. A plain PixelCNN has the blind spot
of its stacked masks (cells up and to the right beyond the kernel are not seen); on the 7x7 or 4x4 grids of our
VQ-VAEs a 7x7 first layer covers most of the grid. Sampling fills the grid cell by cell, ``h * w`` passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vaelab.errors import ConfigError, DataError
from vaelab.runtime import derive_seed

VAL_FRACTION = 0.05  # grids held out to report the validation NLL


@dataclass
class PixelCNNConfig:
    """A ``PixelCNN`` over ``height x width`` grids of ``num_codes`` codes.

    Attributes:
        num_codes: ``K``, values per cell; height, width: the grid.
        hidden: channels of every layer; layers: masked conv layers (one ``A``, ``layers - 1`` residual ``B``).
    """

    num_codes: int
    height: int
    width: int
    hidden: int = 64
    layers: int = 5

    def __post_init__(self) -> None:
        for name in ("num_codes", "height", "width", "hidden", "layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"PixelCNN {name} must be a positive integer, got {v!r}")


class MaskedConv2d(nn.Conv2d):
    """A same-padded ``Conv2d`` whose kernel sees only the cells before the centre in raster order (``"A"``) or
    those and the centre (``"B"``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, mask_type: str):
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        mask = torch.ones(kernel, kernel)
        mask[kernel // 2, kernel // 2 + (mask_type == "B"):] = 0
        mask[kernel // 2 + 1:] = 0
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Code grids ``(B, h, w)`` int64 -> logits ``(B, K, h, w)`` of each cell given the cells before it."""

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        c = config.hidden
        self.embed = nn.Embedding(config.num_codes, c)
        self.first = MaskedConv2d(c, c, 7, "A")
        self.blocks = nn.ModuleList(MaskedConv2d(c, c, 3, "B") for _ in range(config.layers - 1))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, config.num_codes, 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.first(self.embed(idx).permute(0, 3, 1, 2))
        for block in self.blocks:
            h = h + block(F.relu(h))
        return self.head(h)

    def log_prob(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B,)`` ``log p(k)`` of code grids ``idx`` ``(B, h, w)`` in nats."""
        return -F.cross_entropy(self(idx), idx, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` grids ``(n, h, w)`` int64, cell by cell in raster order, on the model's device (``generator`` there)."""
        cfg = self.config
        idx = torch.zeros(n, cfg.height, cfg.width, dtype=torch.int64, device=self.embed.weight.device)
        for i in range(cfg.height):
            for j in range(cfg.width):
                probs = F.softmax(self(idx)[:, :, i, j].float(), dim=1)
                idx[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return idx


class PixelCNNPrior(nn.Module):
    """A fitted ``PixelCNN`` and the VQ-VAE codebook it was fitted with: ``sample`` gives flattened codes
    ``(n, D * h * w)`` (the grid of codebook vectors ``(n, D, h, w)`` flattened, what the VQ-VAE's ``decode``
    takes). ``codebook``: ``(K, D)`` float32."""

    def __init__(self, config: PixelCNNConfig, codebook: torch.Tensor):
        super().__init__()
        self.net = PixelCNN(config)
        self.register_buffer("codebook", codebook.float().clone())

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` codes from the PixelCNN (``y`` ignored: an unconditional prior)."""
        idx = self.net.sample(n, generator=generator)
        return self.codebook[idx].permute(0, 3, 1, 2).flatten(1)


def train_pixelcnn(idx: torch.Tensor, codebook: torch.Tensor, *, options: dict, seed: int,
                   device: torch.device | str = "cpu") -> tuple[PixelCNNPrior, dict]:
    """Fit a ``PixelCNNPrior`` to code grids ``idx`` ``(N, h, w)`` int64 by maximum likelihood.

    Adam with ``options["lr"]`` cosine-decayed to 0 over ``options["epochs"]`` passes of ``options["batch_size"]``
    grids; ``VAL_FRACTION`` of the grids (seeded) are held out and their NLL (nats per grid) is reported per epoch
    beside the uniform prior's ``h * w * log K``.

    Raises:
        DataError: fewer than 2 grids, or a diverged (non-finite) loss.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also when called lazily from a no-grad sampling loop
        return _train(idx, codebook, options=options, seed=seed, device=device)


def _train(idx: torch.Tensor, codebook: torch.Tensor, *, options: dict, seed: int,
           device: torch.device | str) -> tuple[PixelCNNPrior, dict]:
    t0 = time.perf_counter()
    n, h, w = idx.shape
    if n < 2:
        raise DataError(f"a PixelCNN prior needs at least 2 code grids, got {n}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "pixelcnn", "split"))
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, round(VAL_FRACTION * n)) if n >= 20 else 0
    val, train = idx[perm[:n_val]].to(device), idx[perm[n_val:]].to(device)
    config = PixelCNNConfig(num_codes=len(codebook), height=h, width=w, hidden=options["hidden"], layers=options["layers"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "pixelcnn", "init"))
        prior = PixelCNNPrior(config, codebook).to(device)
    net = prior.net
    bs = min(options["batch_size"], len(train))
    steps = options["epochs"] * -(-len(train) // bs)
    opt = torch.optim.Adam(net.parameters(), lr=options["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rows = []
    net.train()
    for epoch in tqdm(range(1, options["epochs"] + 1), desc="training PixelCNN prior", unit="epoch", leave=False):
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, "pixelcnn", "epoch", epoch))
        order = torch.randperm(len(train), device=device, generator=g)
        total = torch.zeros((), device=device)
        for start in range(0, len(order), bs):
            nll = -net.log_prob(train[order[start : start + bs]])
            opt.zero_grad(set_to_none=True)
            nll.mean().backward()
            opt.step()
            sched.step()
            total += nll.detach().sum()
        row = {"epoch": epoch, "train_nll": total.item() / len(train)}
        if n_val:
            with torch.no_grad():
                net.eval()
                row["val_nll"] = -net.log_prob(val).mean().item()
                net.train()
        if not all(math.isfinite(v) for v in row.values()):
            raise DataError(f"the PixelCNN prior diverged at epoch {epoch} (non-finite loss); try --sampler pixelcnn:lr=0.0003")
        rows.append(row)
    prior.eval()
    report = {
        "epochs": rows, "train_grids": len(train), "val_grids": n_val, "steps": steps, "final": rows[-1],
        "uniform_nll": h * w * math.log(len(codebook)), "train_time_s": time.perf_counter() - t0,
        "architecture": asdict(config),
        "units": "nats per code grid (uniform_nll: the uniform prior over the codes that training assumes)",
    }
    return prior, report

"""VAE prior (paper section 4.6): a small VAE trained on a cloud's activations, sampled from its latent prior.

Default cloud: SQuAD activations at the last layer. Inputs are standardised per
dimension; the decoder has one learned output variance (a Gaussian likelihood
N(decoder(z), sigma^2 I) in standardised units), and the KL term is warmed up
over the first third of training (both usual guards against the posterior
collapse the paper ran into). A sample is the VAE's generative model run
forward: z ~ N(0, I), decoded, plus the decoder's Gaussian noise
(`decoder_noise`, on by default; off gives the decoded means only). Training takes a few seconds on a CPU
and is cached on disk under `cache_subdir("priors")`, keyed by the model
fingerprint, the cloud (source, layer, n_docs, data_seed) and every training
option. The diagnostics the paper lacked come with it:

- active_units: latent dimensions whose posterior mean varies over the data (Var > 0.01, Burda et al.)
- recon_rel_error: held-out reconstruction MSE over the data's variance (0 perfect, 1 = predicting the mean)
- spread_ratio: total variance of prior samples, decoder noise included, over the data's (1 = same spread)
- spread_ratio_mean: the same for the decoded means alone (<< 1 = the latent carries little of the spread)
- noise_share: the share of the samples' variance that is decoder noise (1 = the latent explains nothing)

`spread_by_seed` trains the VAE under several seeds on one cloud (default: the
last layer, as in the paper's section 4.6) for a CI of the spread over training seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from core.models import LoadedModel
from core.priors.base import Prior, ReferenceConfig, option, register, resolve_layer
from core.priors.fit import FORMAT_VERSION, MAX_LENGTH, ProgressFn, disk_cache, reference_cloud

_ACTIVE_VAR = 0.01
_VAE_VERSION = 2  # in the cache key: v2 stores the spread with decoder noise


@dataclass
class VaeConfig(ReferenceConfig):
    source: str = option("squad", "Cloud the VAE learns: a dataset's activations (paper: SQuAD, last layer), "
                         "or the token embeddings.", choices=("tokens", "c4", "squad", "math"))
    latent_dim: int = option(16, "Latent dimensions.", min=1, max=256)
    hidden: int = option(128, "Width of the encoder and decoder hidden layers.", min=8, max=2048)
    steps: int = option(500, "Training steps (Adam).", min=10, max=20000, step=100)
    batch_size: int = option(128, "Rows per training step.", min=8, max=4096)
    lr: float = option(2e-3, "Adam learning rate.", min=1e-5, max=0.1, step=1e-4)
    beta: float = option(1.0, "Weight of the KL term after warm-up (beta-VAE).", min=0.0, step=0.1)
    max_rows: int = option(20000, "Rows of the cloud used for training (seeded subsample).", min=100, step=1000)
    decoder_noise: bool = option(True, "Add the decoder's learned Gaussian noise to each decoded sample (the "
                                 "VAE's generative model); off: the decoded means only.")

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        for name in ("latent_dim", "hidden", "steps", "batch_size", "max_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if not float(self.lr) > 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if not float(self.beta) >= 0:
            raise ValueError(f"beta must be non-negative; got {self.beta}")


class Vae(nn.Module):
    """x [B, d] -> (reconstruction [B, d], mu [B, k], logvar [B, k]) in standardised units."""

    def __init__(self, dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, dim))
        self.log_noise = nn.Parameter(torch.zeros(()))  # decoder output log-variance, learned
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(-12, 8)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):  # noqa: ANN201
        mu, logvar = self.encode(x)
        z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar

    def decode_original(self, z: torch.Tensor, noise: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent z [m, k] -> vectors in the cloud's own units [m, d]; with `noise`, plus the decoder's Gaussian
        noise (std exp(log_noise / 2) in standardised units, so scale x that in the cloud's units)."""
        out = self.decoder(z)  # [m, d], standardised
        if noise:
            out = out + torch.randn(out.shape, generator=generator) * (0.5 * self.log_noise).exp()
        return out * self.scale + self.shift


def train_vae(cloud: torch.Tensor, config: VaeConfig) -> tuple[Vae, dict]:
    """Train a VAE on rows of cloud [N, d]; returns the model and its diagnostics.

    Runs on one thread: for these small matrices extra threads only add contention
    (measured 6 ms/step on one thread, 60x slower on two busy cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_vae(cloud, config)
    finally:
        torch.set_num_threads(threads)


def _train_vae(cloud: torch.Tensor, config: VaeConfig) -> tuple[Vae, dict]:
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    x = torch.as_tensor(cloud, dtype=torch.float32)
    if len(x) > config.max_rows:
        x = x[torch.from_numpy(np.sort(rng.choice(len(x), config.max_rows, replace=False)))]
    if len(x) < 20:
        raise ValueError(f"too few points to train a VAE: {len(x)} rows, at least 20 needed (raise n_docs)")
    perm = torch.from_numpy(rng.permutation(len(x)))
    n_val = max(2, len(x) // 10)
    val, train = x[perm[:n_val]], x[perm[n_val:]]
    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model = Vae(x.shape[1], config.hidden, config.latent_dim)
    model.shift.copy_(train.mean(0))
    model.scale.copy_(train.std(0).clamp_min(1e-6))
    ztrain = (train - model.shift) / model.scale  # [N_train, d]
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = max(1, config.steps // 3)
    d = x.shape[1]
    losses = []
    for step in range(config.steps):
        batch = ztrain[torch.randint(len(ztrain), (min(config.batch_size, len(ztrain)),), generator=gen)]
        recon, mu, logvar = model(batch, gen)
        # Gaussian likelihood with one learned variance, per row; KL to N(0, I), per row.
        nll = 0.5 * ((recon - batch).pow(2).sum(1) / model.log_noise.exp() + d * model.log_noise)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        loss = (nll + config.beta * min(1.0, (step + 1) / warmup) * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    diagnostics = vae_diagnostics(model, val, x, config.seed)
    diagnostics.update(train_seconds=time.perf_counter() - start, final_loss=float(np.mean(losses[-20:])),
                       rows=len(x))
    return model, diagnostics


def vae_diagnostics(model: Vae, val: torch.Tensor, data: torch.Tensor, seed: int = 0, n_samples: int = 2000) -> dict:
    """Active latent units, held-out reconstruction error and spread of decoded prior samples vs the data."""
    with torch.no_grad():
        zval = (val - model.shift) / model.scale
        mu, logvar = model.encode(zval)
        active = int((mu.var(0) > _ACTIVE_VAR).sum())
        recon = model.decoder(mu) * model.scale + model.shift
        data_var = float((val - val.mean(0)).pow(2).sum(1).mean())
        rel = float((recon - val).pow(2).sum(1).mean()) / max(data_var, 1e-30)
        gen = torch.Generator().manual_seed(seed + 1)
        z = torch.randn(n_samples, mu.shape[1], generator=gen)  # [n, k] from the latent prior
        data_total = data.var(0).sum().clamp_min(1e-30)
        noisy = float(model.decode_original(z, noise=True, generator=gen).var(0).sum() / data_total)
        means = float(model.decode_original(z).var(0).sum() / data_total)
        kl_dim = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).mean(0)
    return {"active_units": active, "latent_dim": int(mu.shape[1]), "recon_rel_error": rel,
            "spread_ratio": noisy, "spread_ratio_mean": means,
            "noise_share": max(0.0, 1.0 - means / noisy) if noisy > 0 else 0.0,
            "noise_std": float((0.5 * model.log_noise).exp()), "kl_per_dim": [round(float(v), 4) for v in kl_dim]}


def _vae_key(lm: LoadedModel, config: VaeConfig) -> str:
    layer = resolve_layer(config.source, config.layer, lm)
    # decoder_noise only changes sampling, not the trained model
    opts = ",".join(f"{k}={v}" for k, v in sorted(asdict(config).items()) if k not in ("layer", "decoder_noise"))
    return f"vae/v{FORMAT_VERSION}.{_VAE_VERSION}/{lm.fingerprint}/layer={layer},max_length={MAX_LENGTH},{opts}"


@register
class VaePrior(Prior):
    name = "vae"
    Config = VaeConfig
    summary = "decoded draws from the latent prior of a small VAE trained on activations"

    def __init__(self, config: VaeConfig, lm: LoadedModel | None = None, dim: int | None = None,
                 reference: torch.Tensor | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(config, lm, dim)
        if reference is not None:
            self.model, self.diagnostics = train_vae(reference, config)
        elif lm is None:
            raise ValueError("the vae prior trains on a cloud: pass lm= (a loaded model) or reference= ([N, d])")
        else:
            self.model, self.diagnostics = self._cached(lm, config, progress)
        self._dim = int(self.model.shift.shape[0])
        self.custom_reference = reference is not None

    @staticmethod
    def _cached(lm: LoadedModel, config: VaeConfig, progress: ProgressFn | None) -> tuple[Vae, dict]:
        key = _vae_key(lm, config)
        with disk_cache() as disk:
            blob = disk.get(key, default=None, retry=True)
            if blob is not None:
                try:
                    model = Vae(blob["dim"], config.hidden, config.latent_dim)
                    model.load_state_dict({k: torch.from_numpy(v) for k, v in blob["state"].items()})
                    return model.eval().requires_grad_(False), blob["diagnostics"] | {"cached": True}
                except Exception:  # noqa: BLE001 - damaged or outdated entry: retrain below
                    disk.delete(key, retry=True)
            cloud = reference_cloud(lm, config.source, config.layer, config.n_docs, config.data_seed, progress)
            model, diagnostics = train_vae(cloud, config)
            state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            disk.set(key, {"dim": int(cloud.shape[1]), "state": state, "diagnostics": diagnostics}, retry=True)
        return model, diagnostics | {"cached": False}

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.config.latent_dim, generator=generator)  # [n, k] from the latent prior N(0, I)
        with torch.no_grad():
            out = self.model.decode_original(z, noise=bool(self.config.decoder_noise), generator=generator)
        self.last_stats = {k: v for k, v in self.diagnostics.items() if k != "kl_per_dim"}
        return out

    def describe(self) -> str:
        g = self.diagnostics
        c = self.config
        if self.custom_reference:
            where = "a given cloud"
        elif c.source == "tokens":
            where = "token embeddings"
        else:
            where = f"{c.source} activations at layer {resolve_layer(c.source, c.layer, self.lm)}"
        noise = "with decoder noise" if c.decoder_noise else "decoded means only, without the decoder noise"
        return (
            f"VAE prior on {where} ({noise}): {g['active_units']}/{g['latent_dim']} active latent units, "
            f"reconstruction error {g['recon_rel_error']:.2f} of the variance, spread of samples with decoder "
            f"noise {g['spread_ratio']:.2f} x the data's ({g.get('spread_ratio_mean', math.nan):.2f} from the "
            f"decoded means alone)"
        )


def spread_by_seed(lm: LoadedModel, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), source: str = "squad",
                   layer: int | None = None, progress: ProgressFn | None = None, **options: object) -> dict:
    """The VAE prior trained under each seed on one cloud (default: SQuAD at the last layer, the paper's 4.6).

    Returns {"source", "layer", "num_layers", "describe" (seed 0), "diagnostics" (seed 0), "seeds": [{"seed",
    "spread_ratio", "spread_ratio_mean", "noise_share", "active_units", "recon_rel_error"}, ...]}: one row per
    training seed, so a CI of the spread can be taken over seeds (the cloud, data_seed, stays the same).
    """
    rows, first = [], None
    for seed in seeds:
        config = VaeConfig(seed=int(seed), source=source, layer=layer, **options)
        prior = VaePrior(config, lm=lm, progress=progress)
        first = first or prior
        g = prior.diagnostics
        rows.append({"seed": int(seed), **{k: g[k] for k in ("spread_ratio", "spread_ratio_mean", "noise_share",
                                                               "active_units", "recon_rel_error")}})
    if first is None:
        raise ValueError("spread_by_seed needs at least one seed")
    return {"source": source, "layer": resolve_layer(source, layer, lm), "num_layers": lm.num_layers,
            "describe": first.describe(),
            "diagnostics": {k: v for k, v in first.diagnostics.items() if k != "kl_per_dim"}, "seeds": rows}

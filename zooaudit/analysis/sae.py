"""TopK sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")
trained with torch on stored activations.

Model, in the normalised space ``x̃ = (x − μ) / σ`` (``μ`` the data mean, ``σ²`` the mean
squared centred coordinate, so ``E‖x̃‖² = D``):

    z  = ReLU(TopK(W_enc (x̃ − b_pre) + b_enc))       (k_latents,), ``topk`` non-zeros
    x̃' = z W_dec + b_pre                             W_dec (k_latents, D), unit-norm rows

- Decoder rows are initialised as seeded Gaussian directions of unit norm, the encoder
  as the decoder's transpose, both biases at zero (the data is centred, so this is the
  mean Gao et al. take as ``b_pre``'s start).
- Loss: squared error summed over features and averaged over the batch, divided by
  ``D`` (normalised MSE ≈ 1 − explained variance), plus ``aux_coef ×`` the AuxK loss:
  latents that have not fired for one epoch's worth of samples (``N``) reconstruct the
  residual with their own top-``aux_k``, normalised by the residual's variance.
- After each Adam step the decoder rows are renormalised, and the part of their
  gradient parallel to them is removed before it (Gao et al. §A).
- Data is streamed: each epoch visits the row chunks in a seeded order and shuffles
  rows within a chunk, so Dask inputs are never materialised.

Everything random draws from ``random_state`` (a private torch Generator and NumPy
Generator; global seeds are untouched), so CPU training is bitwise reproducible.
Training is float32 on every device.

The result maps back to data units: ``components`` = decoder rows, ``codes = σ·z ≥ 0``,
``mean = μ + σ·b_pre``, so ``codes @ components + mean`` is the reconstruction.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ZooauditError
from ..devices import cpu_threads, resolve_device
from .blocks import layer_matrix, load_rows, row_bounds
from .factorization import Factorization
from .nmf import scan
from .quality import finish


def _positive(value, kind: str, name: str, integer: bool = True, allow_zero: bool = False):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) if integer else \
        isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative" if allow_zero else "a positive"
        raise ZooauditError(f"{kind}={value!r} for the SAE of layer {name!r}: must be {want} "
                            f"{'integer' if integer else 'number'}.")
    return value


def _encode(x, W_enc, b_enc, b_pre, topk):
    pre = (x - b_pre) @ W_enc + b_enc
    vals, idx = pre.topk(topk, dim=1)
    return pre, torch.zeros_like(pre).scatter_(1, idx, vals.relu())


def sae(A, k_latents: int, *, topk: int = 8, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
        aux_k: int | None = None, aux_coef: float = 1 / 32, random_state: int = 0, device=None,
        codes: str = "numpy", name: str = "A") -> Factorization:
    """Train a TopK sparse autoencoder on ``A (N, D)`` (NumPy or Dask).

    Args:
        k_latents: dictionary size (may exceed ``D``). ``topk``: active latents per sample.
        epochs: passes over the data (0 returns the untrained initialisation).
        batch_size, lr: Adam minibatch size and learning rate.
        aux_k: latents used by the AuxK dead-latent loss (default ``2·topk``, capped at
            ``k_latents``; 0 turns it off). ``aux_coef``: its weight.
        device: torch device (``None`` = CPU).
    Returns:
        Factorization(method="sae"): components ``(k_latents, D)`` decoder rows (unit
        norm), codes ``(N, k_latents)`` ≥ 0 with at most ``topk`` non-zeros per row;
        metrics add ``final_loss`` (mean normalised loss over the last epoch).
    """
    A = layer_matrix(A, name)
    n, d = A.shape
    _positive(k_latents, "k_latents", name)
    _positive(topk, "topk", name)
    if topk > k_latents:
        raise ZooauditError(f"topk={topk} exceeds k_latents={k_latents} for the SAE of layer {name!r}; "
                            "need 1 ≤ topk ≤ k_latents.")
    _positive(epochs, "epochs", name, allow_zero=True)
    _positive(batch_size, "batch_size", name)
    _positive(lr, "lr", name, integer=False)
    aux_k = min(2 * topk, k_latents) if aux_k is None else min(_positive(aux_k, "aux_k", name, allow_zero=True),
                                                               k_latents)
    if codes not in ("numpy", "dask"):
        raise ZooauditError(f"Unknown codes {codes!r} for layer {name!r}. Allowed: numpy, dask.")
    dev = resolve_device(device, what=f" for layer {name!r}")
    with cpu_threads(dev, max(batch_size, k_latents) * max(d, k_latents)):
        return _train(A, n, d, k_latents, topk, epochs, batch_size, lr, aux_k, aux_coef, random_state, dev, codes,
                      name)


def _train(A, n, d, k_latents, topk, epochs, batch_size, lr, aux_k, aux_coef, random_state, dev, codes,
           name) -> Factorization:
    sc = scan(A, name, "the SAE", None)
    if sc.ss_centred <= 0:
        raise ZooauditError(f"Layer {name!r} is constant over its {n} samples; an SAE has nothing to learn.")
    mu, sigma = sc.mean, float(np.sqrt(sc.ss_centred / (sc.n * d)))
    gen = torch.Generator(device="cpu").manual_seed(int(random_state))
    rng = np.random.default_rng(random_state)

    W_dec = torch.randn(k_latents, d, generator=gen, dtype=torch.float32)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = W_dec.to(dev).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(k_latents, device=dev, requires_grad=True)
    b_pre = torch.zeros(d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_pre], lr=lr)
    mu_t = torch.as_tensor(mu, dtype=torch.float32, device=dev)
    since_fired = torch.zeros(k_latents, dtype=torch.long, device=dev)
    bounds = row_bounds(A)
    loss_sum, loss_n = 0.0, 0
    for _ in range(epochs):
        loss_sum, loss_n = 0.0, 0
        for i in rng.permutation(len(bounds)):
            start, stop = bounds[i]
            x_all = (torch.as_tensor(load_rows(A, start, stop, np.float32), device=dev) - mu_t) / sigma
            x_all = x_all[torch.randperm(x_all.shape[0], generator=gen).to(dev)]
            for x in torch.split(x_all, batch_size):
                pre, z = _encode(x, W_enc, b_enc, b_pre, topk)
                x_hat = z @ W_dec + b_pre
                loss = ((x_hat - x) ** 2).sum(dim=1).mean() / d
                since_fired += x.shape[0]
                since_fired[(z > 0).any(dim=0)] = 0
                dead = since_fired >= n
                if aux_k and bool(dead.any()):
                    resid = (x - x_hat).detach()
                    k_aux = min(aux_k, int(dead.sum()))
                    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
                    z_aux = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
                    scale = ((resid - resid.mean(dim=0)) ** 2).sum(dim=1).mean().clamp(min=1e-12)
                    loss = loss + aux_coef * ((z_aux @ W_dec - resid) ** 2).sum(dim=1).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():  # keep decoder rows on the unit sphere (Gao et al. §A)
                    W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec
                opt.step()
                with torch.no_grad():
                    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
                loss_sum += float(loss.detach()) * x.shape[0]
                loss_n += x.shape[0]

    comps = W_dec.detach().double().cpu().numpy()
    mean = mu + sigma * b_pre.detach().double().cpu().numpy()
    enc = [W_enc.detach(), b_enc.detach(), b_pre.detach()]

    def transform(start, stop, x):
        with torch.no_grad():
            xt = (torch.as_tensor(np.asarray(x, np.float32), device=dev) - mu_t) / sigma
            return _encode(xt, *enc, topk)[1].double().cpu().numpy() * sigma

    params = {"k": k_latents, "topk": topk, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "aux_k": aux_k, "random_state": random_state}
    return finish("sae", A, comps, mean, transform, codes=codes, rms=np.sqrt(sc.ss_centred / sc.n),
                  extra={"final_loss": loss_sum / loss_n if loss_n else float("nan")}, params=params)

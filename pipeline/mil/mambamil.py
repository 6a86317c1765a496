"""MambaMIL: selective state-space (Mamba) layers over the instance sequence, with sequence reordering
(SR-Mamba); Yang, Wang & Chen, MICCAI 2024.

Instances are embedded, ``h = Dropout(ReLU(W x + b))`` (512-d), then ``layers`` residual blocks
``h = h + SRMamba(LayerNorm(h))``, a final LayerNorm, ABMIL attention pooling (``a ∝ exp(wᵀ tanh(V h_k))``)
and a linear classifier.

Mamba block (Gu & Dao 2023), on a sequence ``h_1..h_L`` (``d_model``): ``[x, z] = W_in h`` (each
``d_inner = expand·d_model``); ``x`` goes through a causal depth-wise 1-D convolution (kernel ``d_conv``) and
SiLU; from ``x`` the input-dependent ("selective") parameters ``Δ = softplus(W_Δ (W_r x) + b_Δ)`` (a rank-``dt_rank``
projection), ``B = W_B x`` and ``C = W_C x`` (``d_state`` each); with ``A = -exp(A_log)`` (``d_inner × d_state``,
S4D-real initialisation ``A_{d,n} = -n``) the zero-order-hold discretisation gives the recurrence

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t,      y_t = h_t C_t + D ⊙ x_t,

per channel ``d`` and state ``n``; the output is ``W_out (y ⊙ SiLU(z))``.

SR-Mamba (the paper's sequence reordering): the block has a second branch on the reordered sequence, in
which instances ``R`` apart become neighbours (positions ``0, R, 2R, …, 1, R+1, …``; ``R = rate``); that
branch has its own convolution, selective projections, ``A`` and ``D`` and shares ``W_in`` / ``W_out``; its
output is put back into the original order and added to the first branch's before the gate and ``W_out``.

The selective scan is written in plain PyTorch and is exact (no approximation): a custom autograd function
runs the recurrence chunk by chunk (``scan_chunk`` steps vectorised per chunk, one fused multiply-add per
step) and keeps only the chunk-boundary states; its backward pass recomputes each chunk's states and runs
the adjoint recurrence ``g_t = C_t gy_t + exp(Δ_{t+1} A) ⊙ g_{t+1}`` backwards. Memory is
``O(L·d_inner + scan_chunk·d_inner·d_state)``; time is linear in ``L`` but, without the fused CUDA kernel,
dominated by ``L·d_inner·d_state`` element-wise work (see the cost benchmark in docs/mil.md).
:func:`selective_scan_reference` is the literal step-by-step recurrence, used to test it.

Defaults (the paper's): 512-d embedding, dropout 0.25, 2 SR-Mamba layers, rate 10, ``d_state`` 16,
``d_conv`` 4, ``expand`` 2, ``dt_rank = ceil(512 / 16)``; Adam(W) lr 2e-4, weight decay 1e-5 (CLAM-style
training, as the paper's code base). ``attention``: the pooling attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model
from ._layers import as_bag, embedding


# ------------------------------------------------------------------------------------------ selective scan

def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """The selective-scan recurrence written step by step (for tests; differentiable through autograd).

    ``u``, ``delta``: ``(L, d)``; ``A``: ``(d, n)``; ``B``, ``C``: ``(L, n)``; ``D``: ``(d,)``. Returns ``y``
    ``(L, d)``.
    """
    L, d = u.shape
    h = u.new_zeros(d, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[t][:, None] * A) * h + (delta[t] * u[t])[:, None] * B[t][None, :]
        y = (h * C[t][None, :]).sum(-1)
        if D is not None:
            y = y + D * u[t]
        ys.append(y)
    return torch.stack(ys) if ys else u.new_zeros(0, d)


class _SelectiveScan(torch.autograd.Function):
    """Exact selective scan, chunked; saves inputs and chunk-boundary states only (see module docstring)."""

    @staticmethod
    def _chunk_states(u, delta, A, B, h0):
        """States ``(T, d, n)`` of one chunk from the state before it, plus ``exp(ΔA)`` of the chunk."""
        dA = torch.exp(delta[:, :, None] * A[None])  # (T, d, n)
        dBu = (delta * u)[:, :, None] * B[:, None, :]  # (T, d, n)
        H = torch.empty_like(dA)
        prev = h0
        for t in range(dA.shape[0]):
            torch.addcmul(dBu[t], dA[t], prev, out=H[t])
            prev = H[t]
        return H, dA

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, chunk):
        L, d = u.shape
        n = A.shape[1]
        h = u.new_zeros(d, n)
        starts = list(range(0, L, chunk))
        hs = []
        y = u.new_empty(L, d)
        for s in starts:
            e = min(L, s + chunk)
            hs.append(h)
            H, _ = _SelectiveScan._chunk_states(u[s:e], delta[s:e], A, B[s:e], h)
            y[s:e] = torch.bmm(H, C[s:e, :, None])[:, :, 0]
            h = H[-1].clone()
        y = y + u * D[None]
        ctx.save_for_backward(u, delta, A, B, C, D, torch.stack(hs) if hs else u.new_zeros(0, d, n))
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, D, hs = ctx.saved_tensors
        chunk = ctx.chunk
        L, d = u.shape
        gy = gy.contiguous()
        gu, gdelta = torch.zeros_like(u), torch.zeros_like(delta)
        gB, gC = torch.zeros_like(B), torch.zeros_like(C)
        gA = torch.zeros_like(A)
        gD = (gy * u).sum(0)
        carry = u.new_zeros(d, A.shape[1])  # exp(Δ_{e} A) ⊙ g_{e}: what the next chunk sends back
        starts = list(range(0, L, chunk))
        for k in range(len(starts) - 1, -1, -1):
            s = starts[k]
            e = min(L, s + chunk)
            h0 = hs[k]
            H, dA = _SelectiveScan._chunk_states(u[s:e], delta[s:e], A, B[s:e], h0)
            G = gy[s:e, :, None] * C[s:e, None, :]  # direct part of dL/dh_t, (T, d, n)
            G[-1] += carry
            for t in range(G.shape[0] - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            carry = dA[0] * G[0]
            Hprev = torch.cat([h0[None], H[:-1]], dim=0)
            gC[s:e] = torch.bmm(gy[s:e, None, :], H)[:, 0, :]  # Σ_d gy_td h_tdn
            gdA = G * Hprev * dA  # dL/d(Δ A) per (t, d, n)
            gA += (gdA * delta[s:e, :, None]).sum(0)
            GB = torch.bmm(G, B[s:e, :, None])[:, :, 0]  # Σ_n G_tdn B_tn, (T, d)
            gdelta[s:e] = (gdA * A[None]).sum(-1) + GB * u[s:e]
            gu[s:e] = GB * delta[s:e]
            gB[s:e] = torch.bmm((delta[s:e] * u[s:e])[:, None, :], G)[:, 0, :]  # Σ_d Δu G
        gu = gu + gy * D[None]
        return gu, gdelta, gA, gB, gC, gD, None


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Exact selective scan (module docstring); computed in float32 (float64 inputs stay float64)."""
    dt = torch.float64 if u.dtype == torch.float64 else torch.float32
    args = [t.to(dt).contiguous() for t in (u, delta, A, B, C, D)]
    return _SelectiveScan.apply(*args, max(1, int(chunk)))


# ------------------------------------------------------------------------------------------ SR-Mamba

def reorder_index(n: int, rate: int, device=None) -> torch.Tensor:
    """The SR-Mamba order: positions ``0, R, 2R, …, 1, R+1, …`` (instances ``R`` apart become neighbours)."""
    idx = torch.arange(n, device=device)
    if rate <= 1 or n <= 1:
        return idx
    return torch.cat([idx[j::rate] for j in range(min(rate, n))])


class _ScanBranch(nn.Module):
    """Convolution, selective projections, ``A`` and ``D`` of one scan direction."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, dt_min: float = 1e-3,
                 dt_max: float = 0.1):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # Mamba's initialisation: Δ's bias is softplus⁻¹ of a log-uniform value in [dt_min, dt_max].
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        L = x.shape[0]
        x = self.conv(x.T[None])[0, :, :L].T  # causal depth-wise convolution, (L, d_inner)
        x = F.silu(x)
        dbc = self.x_proj(x)
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())
        A = -torch.exp(self.A_log.float())
        return selective_scan(x, delta, A, B, C, self.D, chunk)


class SRMamba(nn.Module):
    """A Mamba block with the sequence-reordering branch (``rate > 1``; ``rate <= 1``: plain Mamba)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, rate: int = 10,
                 scan_chunk: int = 16):
        super().__init__()
        self.d_inner = int(expand * d_model)
        dt_rank = math.ceil(d_model / 16)
        self.rate, self.scan_chunk = int(rate), int(scan_chunk)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.fwd = _ScanBranch(self.d_inner, d_state, d_conv, dt_rank)
        self.reordered = _ScanBranch(self.d_inner, d_state, d_conv, dt_rank) if self.rate > 1 else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(h).chunk(2, dim=-1)
        y = self.fwd(x, self.scan_chunk)
        if self.reordered is not None and h.shape[0] > 1:
            order = reorder_index(h.shape[0], self.rate, h.device)
            yr = self.reordered(x[order], self.scan_chunk)
            y = y.index_add(0, order, yr)  # back to the original order, added to the first branch
        y = y.to(z.dtype) * F.silu(z)
        return self.out_proj(y)


class MambaMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, dropout: float = 0.25, layers: int = 2,
                 rate: int = 10, d_state: int = 16, d_conv: int = 4, expand: int = 2, attn_dim: int = 128,
                 scan_chunk: int = 16):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        if int(layers) < 1:
            raise ValueError("layers must be >= 1")
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(self.hidden_dim) for _ in range(int(layers)))
        self.blocks = nn.ModuleList(SRMamba(self.hidden_dim, d_state, d_conv, expand, rate, scan_chunk)
                                    for _ in range(int(layers)))
        self.norm = nn.LayerNorm(self.hidden_dim)
        self.attn = nn.Sequential(nn.Linear(self.hidden_dim, int(attn_dim)), nn.Tanh(),
                                  nn.Linear(int(attn_dim), 1, bias=False))
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = as_bag(features, self.in_dim, "MambaMIL")
        h = self.embed(features)
        if h.shape[0] == 0:
            return {"logits": self.classifier(h.new_zeros(self.hidden_dim)),
                    "attention": h.new_zeros(0, dtype=torch.float32)}
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h)).to(h.dtype)
        h = self.norm(h)
        a = torch.softmax(self.attn(h).squeeze(-1).float(), dim=0)
        z = a.to(h.dtype) @ h
        return {"logits": self.classifier(z), "attention": a, "embedding": z}


@register_model(lr=2e-4, weight_decay=1e-5)
def mambamil(in_dim: int, n_classes: int, hidden_dim: int = 512, dropout: float = 0.25, layers: int = 2,
             rate: int = 10, d_state: int = 16, d_conv: int = 4, expand: int = 2, attn_dim: int = 128,
             scan_chunk: int = 16) -> MambaMIL:
    """MambaMIL: SR-Mamba layers (selective scan, plain PyTorch, exact) + attention pooling (Yang et al. 2024)."""
    return MambaMIL(in_dim, n_classes, hidden_dim=hidden_dim, dropout=dropout, layers=layers, rate=rate,
                    d_state=d_state, d_conv=d_conv, expand=expand, attn_dim=attn_dim, scan_chunk=scan_chunk)

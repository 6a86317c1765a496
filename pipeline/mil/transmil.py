"""TransMIL: transformer-based correlated MIL, Shao et al., NeurIPS 2021.

Instances are projected to 512-d (``ReLU(W x + b)``); the sequence is padded to a square number of tokens
by repeating its first instances, a learnable class token is prepended, and it passes through: a
transformer layer (pre-LayerNorm, Nyström self-attention with 8 heads, residual), the PPEG block
(pyramid position encoding: the tokens are laid out on the square grid and depth-wise 7x7, 5x5 and 3x3
convolutions are added to the identity), a second transformer layer and a final LayerNorm; the class token
is classified by a linear layer. Paper defaults: 512-d, 8 heads, 256 landmarks, 6 Moore-Penrose
iterations, a depth-wise residual convolution (kernel 33) on the values, attention dropout 0.1, the class
token drawn from a standard normal (``torch.randn``, as in the authors' implementation). Training recipe
(the authors' configuration): Lookahead-RAdam (:mod:`pipeline.mil.optim`) lr 2e-4, weight decay 1e-5,
constant learning rate, up to 200 epochs, early stopping on the validation loss with patience 10, gradients
accumulated over 2 bags (``batch_size`` 2).

Nyström attention (Xiong et al., AAAI 2021): the softmax attention ``softmax(Q K^T / √d) V`` is approximated
by ``softmax(Q K̃^T) pinv(softmax(Q̃ K̃^T)) softmax(Q̃ K^T) V`` with ``m`` landmarks ``Q̃, K̃`` (segment means of
the queries and keys, the sequence being zero-padded at the front to a multiple of ``m``) and the
pseudo-inverse from the iterative Moore-Penrose scheme of Razavi et al. Sequences with at most ``m`` tokens
use the exact softmax attention (which the approximation would only reproduce). The pseudo-inverse is
computed in float32 even under bf16 autocast.

``attention``: the class token's row of the attention matrix that the last layer actually applies (exact
softmax up to ``m`` tokens, the Nyström product beyond), averaged over the heads; repeated padding tokens are
added back onto the instance they copy, negative entries of the Nyström approximation are clipped to 0, and
the result is renormalised over the instances. It is differentiable, so AEM's entropy term regularises the
attention the prediction depends on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import register_model
from ._layers import as_bag


def moore_penrose_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of (a batch of) square matrices (Razavi et al. 2014)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        abs_x = x.abs()
        col = abs_x.sum(dim=-1)
        row = abs_x.sum(dim=-2)
        z = x.transpose(-1, -2) / (col.amax(dim=-1) * row.amax(dim=-1))[..., None, None]
        eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
        for _ in range(int(iters)):
            xz = x @ z
            z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_conv_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        dim_head = int(dim_head or dim // heads)
        self.heads, self.dim_head, self.m = int(heads), dim_head, int(num_landmarks)
        self.pinv_iterations = int(pinv_iterations)
        self.scale = dim_head ** -0.5
        inner = self.heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(float(dropout)))
        k = int(residual_conv_kernel)
        self.res_conv = nn.Conv2d(self.heads, self.heads, (k, 1), padding=(k // 2, 0), groups=self.heads,
                                  bias=False) if k > 0 else None

    def forward(self, x: torch.Tensor, cls_attention: bool = False):
        """``x`` ``(n, dim)`` -> ``(n, dim)``; with ``cls_attention`` also the row of token 0 (its query over
        all tokens) of the attention matrix applied, exact or Nyström, averaged over the heads, ``(n,)``."""
        n = x.shape[0]
        h, d = self.heads, self.dim_head
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, h, d).transpose(0, 1) for t in (q, k, v))  # (h, n, d)
        q = q * self.scale
        cls_row = None
        if n <= self.m:
            attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            out = attn @ v
            if cls_attention:
                cls_row = attn[:, 0]  # (h, n)
        else:
            pad = (-n) % self.m
            qp = torch.nn.functional.pad(q, (0, 0, pad, 0))
            kp = torch.nn.functional.pad(k, (0, 0, pad, 0))
            vp = torch.nn.functional.pad(v, (0, 0, pad, 0))
            seg = (n + pad) // self.m
            q_l = qp.reshape(h, self.m, seg, d).sum(dim=2) / seg
            k_l = kp.reshape(h, self.m, seg, d).sum(dim=2) / seg
            attn1 = torch.softmax(qp @ k_l.transpose(-1, -2), dim=-1)
            attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
            attn3 = torch.softmax(q_l @ kp.transpose(-1, -2), dim=-1)
            inv = moore_penrose_pinv(attn2, self.pinv_iterations).to(attn1.dtype)
            out = (attn1 @ inv) @ (attn3 @ vp)
            out = out[:, pad:]
            if cls_attention:  # token 0 sits at row ``pad`` of the padded sequence
                cls_row = ((attn1[:, pad:pad + 1] @ inv) @ attn3)[:, 0, pad:]  # (h, n)
        if self.res_conv is not None:
            out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)
        out = self.to_out(out.transpose(0, 1).reshape(n, h * d))
        if not cls_attention:
            return out
        return out, cls_row.float().mean(dim=0)


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, num_landmarks: int, pinv_iterations: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, num_landmarks=num_landmarks,
                                     pinv_iterations=pinv_iterations, dropout=dropout)

    def forward(self, x: torch.Tensor, cls_attention: bool = False):
        if cls_attention:
            y, a = self.attn(self.norm(x), cls_attention=True)
            return x + y, a
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depth-wise 7x7, 5x5 and 3x3 convolutions."""

    def __init__(self, dim: int):
        super().__init__()
        self.p7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.p5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.p3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tokens = x[:1], x[1:]
        grid = tokens.T.reshape(1, -1, side, side)
        grid = grid + self.p7(grid) + self.p5(grid) + self.p3(grid)
        return torch.cat([cls, grid.reshape(x.shape[1], -1).T], dim=0)


class TransMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, dim: int = 512, heads: int = 8, num_landmarks: int = 256,
                 pinv_iterations: int = 6, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.n_classes, self.dim = int(in_dim), int(n_classes), int(dim)
        self.fc1 = nn.Sequential(nn.Linear(self.in_dim, self.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, self.dim))
        self.layer1 = TransLayer(self.dim, heads, num_landmarks, pinv_iterations, dropout)
        self.pos = PPEG(self.dim)
        self.layer2 = TransLayer(self.dim, heads, num_landmarks, pinv_iterations, dropout)
        self.norm = nn.LayerNorm(self.dim)
        self.classifier = nn.Linear(self.dim, self.n_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        features = as_bag(features, self.in_dim, "TransMIL")
        h = self.fc1(features)
        n = h.shape[0]
        if n == 0:
            x = self.layer2(self.layer1(self.cls_token))
            return {"logits": self.classifier(self.norm(x)[0]), "attention": h.new_zeros(0, dtype=torch.float32)}
        side = math.ceil(math.sqrt(n))
        source = torch.arange(side * side, device=h.device) % n  # instance behind each grid token
        x = torch.cat([self.cls_token.to(h.dtype), h[source]], dim=0)
        x = self.layer1(x)
        x = self.pos(x, side)
        x, a = self.layer2(x, cls_attention=True)
        logits = self.classifier(self.norm(x)[0])
        att = torch.zeros(n, dtype=a.dtype, device=a.device).index_add(0, source, a[1:]).clamp_min(0.0)
        att = att / att.sum().clamp_min(1e-12)
        return {"logits": logits, "attention": att}


@register_model(lr=2e-4, weight_decay=1e-5, optimizer="radam_lookahead", schedule="constant", epochs=200,
                patience=10, batch_size=2)
def transmil(in_dim: int, n_classes: int, dim: int = 512, heads: int = 8, num_landmarks: int = 256,
             pinv_iterations: int = 6, dropout: float = 0.1) -> TransMIL:
    """TransMIL: Nyström-attention transformer with PPEG position encoding (Shao et al. 2021)."""
    return TransMIL(in_dim, n_classes, dim=dim, heads=heads, num_landmarks=num_landmarks,
                    pinv_iterations=pinv_iterations, dropout=dropout)

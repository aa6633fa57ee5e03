"""Sequential photo-to-sketch generator G (Part 2 of METHOD.md).

A sketch-rnn style VAE whose decoder is conditioned on a photo:

* a small CNN encoder turns the photo into a feature map ``(B, C, H, W)`` and,
  from its global average pool, a Gaussian latent ``z`` (``mu``, ``logvar``,
  reparameterised);
* an LSTM decoder (``nn.LSTMCell``, a Python loop over *time steps* only, the
  batch is always processed at once) whose initial ``(h, c)`` is
  ``tanh(Linear(z))``; every step reads ``[previous stroke-5 point, z,
  attention context]``;
* the attention is 2-D additive (Bahdanau) attention over the ``H*W``
  feature-map positions, queried with the previous hidden state; the
  feature vectors are augmented with their (x, y) coordinates in [-1, 1] so
  the context also says *where* the decoder looks;
* the output head (reading ``[h_t, context_t]``) gives ``M`` mixture logits,
  ``M`` bivariate Gaussians ``(mu_x, mu_y, sigma_x, sigma_y, rho)`` over the
  *standardised* offsets and 3 pen-state logits (down, up, end).

Units and formats
-----------------
Every stroke-5 tensor that crosses the public API is in **raw units** (the
units of the stroke-3 data, e.g. pixels). The model divides offsets by its
``offset_scale`` buffer (the training-set std of dx, dy; set it with
``set_offset_scale`` or the constructor) before they enter the network and
multiplies sampled offsets back. All densities (losses, ``log_prob``,
``sample``'s log-probability) are densities over the *standardised* offsets,
i.e. independent of the data's scale (they differ from raw-unit densities by
the constant ``-log(scale_x * scale_y)`` per offset row, which changes no
gradient).

* ``loss`` takes the output of ``sbir.strokes.pad_stroke5``: ``(B, T+1, 5)``
  whose first row is the start token ``(0, 0, 1, 0, 0)``, plus ``lengths`` =
  number of real rows *including* the end row ``(0, 0, 0, 0, 1)``.
* ``sample`` returns ``(B, max_len, 5)`` **without** a start token; row
  ``lengths[b]-1`` is the end row and every row after it is padding
  ``(0, 0, 0, 0, 1)``. ``log_prob`` takes that same format (no start token).
  ``with_start_token`` converts between the two.

Masking (``loss`` and ``log_prob``)
-----------------------------------
* GMM NLL: only real offset rows ``t < lengths-1`` (the end row and the
  padding carry no offset, as in sketch-rnn).
* Pen CE: every row ``t < lengths`` -- the end row is INCLUDED so the model
  learns to stop. Padding beyond the end row is MASKED OUT (not counted as
  "end"), so changing padded rows changes nothing.
* ``gmm_nll`` is the mean over offset rows of the batch, ``pen_ce`` the mean
  over pen rows, ``kl`` is sketch-rnn's KL (mean over latent dimensions and
  batch) floored at ``kl_floor``; ``total = gmm_nll + pen_ce + kl_weight*kl``.

The latent for sampling / scoring
---------------------------------
``sample`` and ``log_prob`` condition on ``z = mu(photo)`` (the posterior
mean) unless a ``z`` is passed, so both see the same policy and agree: for
temperature 1 (or the same temperature and pen_temperature passed to both),
``sample(...)[2] == log_prob(photos, stroke5, lengths)`` up to float error.
For a stochastic latent draw it yourself (``encode`` + ``reparameterise``)
and pass the same ``z`` to both. REINFORCE recipe: sample under
``torch.no_grad()``, compute rewards, then ``log_prob`` *with* grad and
``reinforce_loss``.

The log-probability of a sampled offset is the *marginal* mixture density
``log sum_k pi_k N(offset | k)`` (the mixture choice is summed out, which is
exactly what ``log_prob`` computes under teacher forcing; it is a valid and
lower-variance score function). The pen state adds ``log p(pen)``. A sequence
that does not stop by ``max_len`` gets its last row forced to the end state;
that row contributes ``log p(end)`` (as ``log_prob`` would), so a forced end is
penalised rather than hidden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SketchGeneratorConfig",
    "PhotoToSketchGenerator",
    "AdditiveAttention",
    "additive_attention",
    "bivariate_normal_log_prob",
    "gmm_log_prob",
    "reinforce_loss",
    "MovingAverageBaseline",
    "with_start_token",
    "train_on_strokes",
]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


@dataclass
class SketchGeneratorConfig:
    """Hyper-parameters of :class:`PhotoToSketchGenerator`.

    ``feature_stride`` is the total down-sampling of the encoder (a power of
    two, at most ``2 ** len(encoder_channels)``): the first
    ``log2(feature_stride)`` conv blocks have stride 2, the rest stride 1, so
    a 32 px photo gives an 8x8 map with stride 4 and 4x4 with stride 8.
    ``image_size`` is informational (the encoder accepts any size); photos are
    not resized.

    ``encoder``: "conv" (the GroupNorm conv blocks of ``encoder_channels``,
    trained from scratch), "small_cnn" (input normalisation and the first
    ``1 + log2(feature_stride)`` blocks of a :class:`~sbir.models.backbones.SmallCNN`
    of width ``encoder_width``: the layout of a photo teacher's backbone, whose
    weights the sketch_generator stage copies in) or "efficientnet_lite0" (input
    normalisation, stem and the stages of timm's EfficientNet-Lite0 up to
    ``feature_stride``; the stage copies in a photo teacher's or the packaged
    ImageNet weights); kept fixed when ``freeze_encoder`` (no gradient,
    BatchNorm statistics frozen).

    ``global_backbone`` (a ``BackboneParams`` dump, or None): a whole frozen
    backbone (input normalisation + backbone, e.g. the photo teacher's) whose
    pooled features join the encoder's pooled map in the input of ``mu`` and
    ``logvar``. The early blocks of the attention map tell local shape but
    hardly the class; this global vector tells G what object it draws.
    """

    image_size: int = 32
    in_channels: int = 3
    encoder_channels: tuple[int, ...] = (32, 64, 96)
    feature_stride: int = 4
    latent_dim: int = 64
    decoder_hidden: int = 256
    attention_dim: int = 128
    num_mixtures: int = 20
    max_len: int = 80
    kl_floor: float = 0.2
    kl_weight: float = 0.5
    kl_weight_start: float = 0.01
    kl_anneal_steps: int = 10_000
    grad_clip: float = 1.0
    encoder: str = "conv"
    encoder_width: int = 32
    freeze_encoder: bool = False
    global_backbone: dict | None = None
    decoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        s = int(self.feature_stride)
        if s < 1 or s & (s - 1):
            raise ValueError(f"feature_stride must be a power of two, got {s}")
        if self.encoder not in ("conv", "small_cnn", "efficientnet_lite0"):
            raise ValueError(f"encoder must be 'conv', 'small_cnn' or 'efficientnet_lite0', got {self.encoder!r}")
        if self.encoder == "efficientnet_lite0" and not 2 <= s <= 32:
            raise ValueError(f"an efficientnet_lite0 encoder has feature strides 2 to 32, got {s}")
        if self.encoder == "conv" and s > 2 ** len(self.encoder_channels):
            raise ValueError(
                f"feature_stride {s} needs more than {len(self.encoder_channels)} conv blocks"
            )
        if not 0.0 <= self.decoder_dropout < 1.0:
            raise ValueError(f"decoder_dropout must be in [0, 1), got {self.decoder_dropout}")
        if self.num_mixtures < 1 or self.latent_dim < 1 or self.decoder_hidden < 1:
            raise ValueError("num_mixtures, latent_dim and decoder_hidden must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------


def bivariate_normal_log_prob(
    dx: Tensor, dy: Tensor, mu_x: Tensor, mu_y: Tensor,
    sigma_x: Tensor, sigma_y: Tensor, rho: Tensor, eps: float = 1e-6,
) -> Tensor:
    """log N((dx, dy) | mu, Sigma) of a bivariate normal with correlation rho.

    All arguments broadcast against each other (typically ``dx``/``dy`` have a
    trailing singleton dimension against ``(..., M)`` parameters).
    ``1 - rho**2`` is clamped at ``eps`` for stability.
    """
    zx = (dx - mu_x) / sigma_x
    zy = (dy - mu_y) / sigma_y
    one_m_r2 = (1.0 - rho * rho).clamp_min(eps)
    quad = (zx * zx + zy * zy - 2.0 * rho * zx * zy) / one_m_r2
    return (
        -_LOG_2PI - torch.log(sigma_x) - torch.log(sigma_y)
        - 0.5 * torch.log(one_m_r2) - 0.5 * quad
    )


def gmm_log_prob(
    dx: Tensor, dy: Tensor, pi_logits: Tensor, mu_x: Tensor, mu_y: Tensor,
    sigma_x: Tensor, sigma_y: Tensor, rho: Tensor,
) -> Tensor:
    """Log density of (dx, dy) under a mixture of bivariate normals.

    ``dx``, ``dy``: shape ``(...)``; the parameters: ``(..., M)``. The mixture
    weights are ``log_softmax(pi_logits)``; returns ``logsumexp_k(log pi_k +
    log N_k)`` of shape ``(...)``.
    """
    comp = bivariate_normal_log_prob(
        dx.unsqueeze(-1), dy.unsqueeze(-1), mu_x, mu_y, sigma_x, sigma_y, rho
    )
    return torch.logsumexp(F.log_softmax(pi_logits, dim=-1) + comp, dim=-1)


class AdditiveAttention(nn.Module):
    """Bahdanau attention: ``e_j = v^T tanh(W_k f_j + W_q h)``, softmax over j.

    ``keys(features)`` pre-computes ``W_k f`` once per batch, then ``forward``
    is called every decoder step.
    """

    def __init__(self, feature_dim: int, query_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim, bias=False)
        self.query = nn.Linear(query_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def keys(self, features: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, A)``."""
        return self.key(features)

    def forward(self, query: Tensor, features: Tensor, keys: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """query ``(B, Q)``, features ``(B, N, D)`` -> (context ``(B, D)``,
        weights ``(B, N)`` summing to one over N)."""
        if keys is None:
            keys = self.keys(features)
        scores = self.v(torch.tanh(keys + self.query(query).unsqueeze(1))).squeeze(-1)
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights.unsqueeze(1), features).squeeze(1)
        return context, weights


def additive_attention(query: Tensor, features: Tensor, attention: AdditiveAttention
                       ) -> tuple[Tensor, Tensor]:
    """Functional alias of ``attention(query, features)``."""
    return attention(query, features)


def reinforce_loss(log_prob: Tensor, reward: Tensor, baseline: float | Tensor = 0.0) -> Tensor:
    """REINFORCE surrogate ``-mean((reward - baseline).detach() * log_prob)``.

    Minimising it raises the log-probability of sequences with a positive
    advantage and lowers it for a negative one.
    """
    advantage = (reward - baseline)
    if isinstance(advantage, Tensor):
        advantage = advantage.detach()
    return -(advantage * log_prob).mean()


class MovingAverageBaseline:
    """Exponential moving average of the mean reward.

    ``value`` is the baseline *before* the next update (0.0 until the first
    update); ``update(rewards)`` folds in the batch mean (the first update sets
    it to that mean) and returns the new value. For a baseline independent of
    the current batch read ``value`` first, then call ``update``.
    """

    def __init__(self, decay: float = 0.9, initial: float | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.decay = float(decay)
        self._value: float | None = None if initial is None else float(initial)

    @property
    def value(self) -> float:
        return 0.0 if self._value is None else self._value

    def update(self, rewards: Tensor | np.ndarray | Sequence[float] | float) -> float:
        if isinstance(rewards, Tensor):
            m = float(rewards.detach().float().mean())
        else:
            m = float(np.mean(np.asarray(rewards, dtype=np.float64)))
        if self._value is None:
            self._value = m
        else:
            self._value = self.decay * self._value + (1.0 - self.decay) * m
        return self._value

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self._value}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self._value = None if state["value"] is None else float(state["value"])


def with_start_token(stroke5: Tensor) -> Tensor:
    """Prepend the start token ``(0, 0, 1, 0, 0)``: ``(B, T, 5) -> (B, T+1, 5)``."""
    start = stroke5.new_zeros(stroke5.shape[0], 1, 5)
    start[:, 0, 2] = 1.0
    return torch.cat([start, stroke5], dim=1)


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class FrozenModule(nn.Module):
    """A pretrained module kept fixed: no gradient and always in eval mode (BatchNorm statistics frozen)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrozenModule":
        self.training = mode  # the wrapped module stays in eval mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def _build_encoder(cfg: SketchGeneratorConfig) -> tuple[nn.Module, int]:
    """The photo encoder of ``cfg`` and its output channels (see :class:`SketchGeneratorConfig`)."""
    n_down = int(math.log2(cfg.feature_stride))
    if cfg.encoder == "small_cnn":
        from sbir.models.backbones import Normalise, SmallCNN

        cnn = SmallCNN(cfg.encoder_width, depth=1 + n_down)  # block 0 keeps the size, each later one halves it
        encoder: nn.Module = nn.Sequential(Normalise(), cnn.features)
        return (FrozenModule(encoder) if cfg.freeze_encoder else encoder), cnn.out_dim
    if cfg.encoder == "efficientnet_lite0":
        from sbir.models.backbones import build_normalise
        from sbir.models.pretrained import efficientnet_lite0, efficientnet_trunk
        from sbir.config import BackboneParams

        trunk, channels = efficientnet_trunk(efficientnet_lite0(0), cfg.feature_stride)
        encoder = nn.Sequential(build_normalise(BackboneParams(name="efficientnet_lite0", pretrained=True)), trunk)
        return (FrozenModule(encoder) if cfg.freeze_encoder else encoder), channels
    layers: list[nn.Module] = []
    c_in = cfg.in_channels
    for i, c in enumerate(cfg.encoder_channels):
        stride = 2 if i < n_down else 1
        layers += [
            nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(c), c),
            nn.ReLU(inplace=True),
        ]
        c_in = c
    return nn.Sequential(*layers), cfg.encoder_channels[-1]


def _build_global_encoder(cfg: SketchGeneratorConfig) -> tuple[nn.Module | None, int]:
    """The frozen whole-photo encoder of ``cfg.global_backbone`` (None: no global context) and its output size."""
    if cfg.global_backbone is None:
        return None, 0
    from sbir.config import BackboneParams
    from sbir.models.backbones import build_backbone, build_normalise

    bp = BackboneParams(**{**cfg.global_backbone, "weights_path": None})  # the weights come with G's state dict
    backbone = build_backbone(bp)
    return FrozenModule(nn.Sequential(build_normalise(bp), backbone)), int(backbone.out_dim)


class PhotoToSketchGenerator(nn.Module):
    """Photo-conditioned sketch-rnn VAE (see the module docstring)."""

    def __init__(self, config: SketchGeneratorConfig | None = None,
                 offset_scale: float | Sequence[float] | Tensor = 1.0):
        super().__init__()
        cfg = config or SketchGeneratorConfig()
        self.config = cfg
        self.encoder, c_feat = _build_encoder(cfg)
        self.global_encoder, c_global = _build_global_encoder(cfg)
        self.feature_dim = c_feat + 2  # + (x, y) coordinates
        self.to_mu = nn.Linear(c_feat + c_global, cfg.latent_dim)
        self.to_logvar = nn.Linear(c_feat + c_global, cfg.latent_dim)
        self.init_state = nn.Linear(cfg.latent_dim, 2 * cfg.decoder_hidden)
        self.attention = AdditiveAttention(self.feature_dim, cfg.decoder_hidden, cfg.attention_dim)
        self.cell = nn.LSTMCell(5 + cfg.latent_dim + self.feature_dim, cfg.decoder_hidden)
        self.head = nn.Linear(cfg.decoder_hidden + self.feature_dim, 6 * cfg.num_mixtures + 3)
        self.register_buffer("offset_scale", torch.ones(2))
        self.set_offset_scale(offset_scale)

    # ---------------------------------------------------------------- utils
    def set_offset_scale(self, scale: float | Sequence[float] | Tensor) -> None:
        """Set the (dx, dy) std used to standardise offsets (scalar or 2 values)."""
        s = torch.as_tensor(scale, dtype=torch.float32).flatten()
        if s.numel() == 1:
            s = s.repeat(2)
        if s.numel() != 2 or not bool(torch.all(s > 0)):
            raise ValueError(f"offset_scale must be one or two positive numbers, got {scale}")
        self.offset_scale.copy_(s.to(self.offset_scale.device))

    def kl_weight_at(self, step: int | None) -> float:
        """Linear ramp from ``kl_weight_start`` to ``kl_weight`` over
        ``kl_anneal_steps`` steps; ``None`` (or ``kl_anneal_steps <= 0``)
        gives the final weight."""
        cfg = self.config
        if step is None or cfg.kl_anneal_steps <= 0:
            return float(cfg.kl_weight)
        frac = min(max(float(step) / cfg.kl_anneal_steps, 0.0), 1.0)
        return float(cfg.kl_weight_start + (cfg.kl_weight - cfg.kl_weight_start) * frac)

    def clip_gradients(self) -> float:
        """Clip the global gradient norm at ``config.grad_clip`` (if > 0)."""
        if self.config.grad_clip and self.config.grad_clip > 0:
            return float(nn.utils.clip_grad_norm_(self.parameters(), self.config.grad_clip))
        return float("nan")

    def _scale_in(self, stroke5: Tensor) -> Tensor:
        """raw-unit stroke-5 -> standardised offsets (pen columns unchanged)."""
        stroke5 = stroke5.to(self.offset_scale.device, torch.float32)
        return torch.cat([stroke5[..., :2] / self.offset_scale, stroke5[..., 2:]], dim=-1)

    # -------------------------------------------------------------- encoder
    def encode(self, photos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """photos ``(B, C, H, W)`` -> (features ``(B, H'*W', C'+2)`` incl. the
        coordinate channels, mu ``(B, L)``, logvar ``(B, L)``)."""
        fmap = self.encoder(photos.float())
        pooled = fmap.mean(dim=(2, 3))
        if self.global_encoder is not None:
            pooled = torch.cat([pooled, self.global_encoder(photos.float()).to(pooled.dtype)], dim=1)
        # fp32 (a no-op unless a mixed-precision loop autocasts): the KL term and the reparameterisation
        mu = self.to_mu(pooled).float()
        logvar = self.to_logvar(pooled).float()
        b, _, h, w = fmap.shape
        ys = torch.linspace(-1.0, 1.0, h, device=fmap.device) if h > 1 else fmap.new_zeros(1)
        xs = torch.linspace(-1.0, 1.0, w, device=fmap.device) if w > 1 else fmap.new_zeros(1)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([gx, gy], dim=0).unsqueeze(0).expand(b, 2, h, w)
        feats = torch.cat([fmap, coords], dim=1).flatten(2).transpose(1, 2)
        return feats, mu, logvar

    @staticmethod
    def reparameterise(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None
                       ) -> Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    # -------------------------------------------------------------- decoder
    def _initial_state(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h, c = torch.tanh(self.init_state(z)).chunk(2, dim=-1)
        return h.contiguous(), c.contiguous()

    def _recur(self, x: Tensor, z: Tensor, h: Tensor, c: Tensor,
               feats: Tensor, keys: Tensor, dropout: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The recurrent part of one decoder step: (attention context, weights, h, c).
        x: previous stroke-5 point (standardised); ``dropout`` on the cell's input (VAE training only)."""
        ctx, attn = self.attention(h, feats, keys)
        inp = torch.cat([x, z, ctx], dim=-1)
        h, c = self.cell(F.dropout(inp, dropout) if dropout > 0 else inp, (h, c))
        return ctx, attn, h, c

    def _step(self, x: Tensor, z: Tensor, h: Tensor, c: Tensor,
              feats: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoder step with its output head (sampling needs each step's output before the next)."""
        ctx, attn, h, c = self._recur(x, z, h, c, feats, keys)
        return self.head(torch.cat([h, ctx], dim=-1)), attn, h, c

    def _split_head(self, out: Tensor, temperature: float = 1.0,
                    pen_temperature: float | None = None) -> dict[str, Tensor]:
        m = self.config.num_mixtures
        # the mixture in fp32 (a no-op unless a mixed-precision loop autocasts): exp(log sigma) and the
        # bivariate normal densities lose too much in bf16/fp16
        pi, mx, my, lsx, lsy, r, pen = torch.split(out.float(), [m, m, m, m, m, m, 3], dim=-1)
        sx, sy = torch.exp(lsx), torch.exp(lsy)
        if temperature != 1.0:
            pi = pi / temperature
            st = math.sqrt(temperature)
            sx, sy = sx * st, sy * st
        # The end state fires once per sketch, so its probability is never the largest: sharpening
        # the pen logits (sketch-rnn tempers them with the offsets) all but removes it and most
        # samples run to max_len. A separate pen temperature keeps the stop decision calibrated.
        pen_t = temperature if pen_temperature is None else pen_temperature
        if pen_t != 1.0:
            pen = pen / pen_t
        return {"pi_logits": pi, "mu_x": mx, "mu_y": my, "sigma_x": sx, "sigma_y": sy,
                "rho": torch.tanh(r), "pen_logits": pen}

    def _decode(self, feats: Tensor, z: Tensor, x_in: Tensor, temperature: float = 1.0,
                pen_temperature: float | None = None, dropout: float = 0.0) -> dict[str, Tensor]:
        """Teacher-forced decoding of standardised inputs ``x_in (B, T, 5)``; ``dropout`` on the cell's and
        the head's inputs (the VAE loss in train mode only: sampling and ``log_prob`` never drop, so
        REINFORCE scores exactly the policy it sampled from)."""
        h, c = self._initial_state(z)
        keys = self.attention.keys(feats)
        states, attns = [], []
        for t in range(x_in.shape[1]):
            ctx, attn, h, c = self._recur(x_in[:, t], z, h, c, feats, keys, dropout)
            states.append(torch.cat([h, ctx], dim=-1))
            attns.append(attn)
        # teacher forcing knows every input up front: the head runs once over all steps, not once per step
        stacked = torch.stack(states, dim=1)
        out = self.head(F.dropout(stacked, dropout) if dropout > 0 else stacked)
        params = self._split_head(out, temperature, pen_temperature)
        params["attention"] = torch.stack(attns, dim=1)
        return params

    def _latent(self, mu: Tensor, logvar: Tensor, z: Tensor | None, mode: str) -> Tensor:
        if z is not None:
            return z.to(mu.device, mu.dtype)
        if mode == "sample" or (mode == "auto" and self.training):
            return self.reparameterise(mu, logvar)
        return mu

    def forward(self, photos: Tensor, stroke5_in: Tensor, z: Tensor | None = None,
                latent: str = "auto") -> dict[str, Tensor]:
        """Teacher-forced pass.

        ``stroke5_in``: decoder inputs ``(B, T, 5)`` in raw units (start token
        first, i.e. ``padded[:, :-1]``). ``latent``: "auto" (reparameterised
        sample in train mode, ``mu`` in eval mode), "sample" or "mean";
        ignored when ``z`` is given.

        Returns pi_logits, mu_x, mu_y, sigma_x, sigma_y, rho ``(B, T, M)``
        (over standardised offsets), pen_logits ``(B, T, 3)``, attention
        ``(B, T, H*W)``, mu, logvar, z ``(B, L)``.
        """
        feats, mu, logvar = self.encode(photos)
        zz = self._latent(mu, logvar, z, latent)
        params = self._decode(feats, zz, self._scale_in(stroke5_in))
        params.update(mu=mu, logvar=logvar, z=zz)
        return params

    # -------------------------------------------------------------- scoring
    @staticmethod
    def _masks(lengths: Tensor, t: int, device) -> tuple[Tensor, Tensor]:
        lengths = torch.as_tensor(lengths, device=device).long().view(-1, 1)
        idx = torch.arange(t, device=device).view(1, -1)
        pen_mask = idx < lengths
        gmm_mask = idx < (lengths - 1)
        return gmm_mask.float(), pen_mask.float()

    @staticmethod
    def _clean_padding(rows: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        """Overwrite rows ``t >= lengths`` of ``(B, T, 5)`` with the end row, so
        whatever the padding holds (even NaN) cannot reach the network."""
        lengths = torch.as_tensor(lengths, device=rows.device).long().view(-1, 1)
        keep = (torch.arange(rows.shape[1], device=rows.device).view(1, -1) < lengths)
        end = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], device=rows.device, dtype=rows.dtype)
        return torch.where(keep.unsqueeze(-1), rows, end)

    def _row_log_probs(self, params: dict[str, Tensor], target: Tensor, lengths: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row masked GMM and pen log-probs of standardised targets."""
        gmm_mask, pen_mask = self._masks(lengths, target.shape[1], target.device)
        gmm_lp = gmm_log_prob(target[..., 0], target[..., 1], params["pi_logits"],
                              params["mu_x"], params["mu_y"], params["sigma_x"],
                              params["sigma_y"], params["rho"])
        pen_idx = target[..., 2:].argmax(dim=-1)
        pen_lp = F.log_softmax(params["pen_logits"], dim=-1).gather(
            -1, pen_idx.unsqueeze(-1)).squeeze(-1)
        # where() (not just *mask) so garbage in padded rows cannot leak NaN/inf
        gmm_lp = torch.where(gmm_mask > 0, gmm_lp, torch.zeros_like(gmm_lp))
        pen_lp = torch.where(pen_mask > 0, pen_lp, torch.zeros_like(pen_lp))
        return gmm_lp, pen_lp, gmm_mask, pen_mask

    def loss(self, photos: Tensor, stroke5: Tensor, lengths: Tensor | Sequence[int],
             step: int | None = None, z: Tensor | None = None) -> dict[str, Tensor]:
        """VAE loss on padded sequences.

        ``stroke5``: ``(B, T+1, 5)`` raw units, start token first (the output
        of ``sbir.strokes.pad_stroke5``); ``lengths``: real rows incl. the end
        row. ``step`` selects the annealed KL weight (``None``: final weight).
        The latent is reparameterised in train mode, ``mu`` in eval mode.
        Returns total, gmm_nll, pen_ce, kl (floored), kl_raw, kl_weight.
        """
        x = self._scale_in(stroke5)
        x = torch.cat([x[:, :1], self._clean_padding(x[:, 1:], lengths)], dim=1)
        feats, mu, logvar = self.encode(photos)
        zz = self._latent(mu, logvar, z, "auto")
        params = self._decode(feats, zz, x[:, :-1], dropout=self.config.decoder_dropout if self.training else 0.0)
        gmm_lp, pen_lp, gmm_mask, pen_mask = self._row_log_probs(params, x[:, 1:], lengths)
        gmm_nll = -gmm_lp.sum() / gmm_mask.sum().clamp_min(1.0)
        pen_ce = -pen_lp.sum() / pen_mask.sum().clamp_min(1.0)
        kl_raw = -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())
        kl = torch.clamp(kl_raw, min=self.config.kl_floor)
        w = self.kl_weight_at(step)
        total = gmm_nll + pen_ce + w * kl
        return {"total": total, "gmm_nll": gmm_nll, "pen_ce": pen_ce, "kl": kl,
                "kl_raw": kl_raw.detach(), "kl_weight": torch.tensor(w)}

    def log_prob(self, photos: Tensor, stroke5: Tensor, lengths: Tensor | Sequence[int],
                 z: Tensor | None = None, temperature: float = 1.0,
                 pen_temperature: float | None = None) -> Tensor:
        """Sequence log-likelihood ``(B,)`` of ``stroke5`` (``(B, T, 5)`` raw
        units, NO start token, the format of ``sample``) under teacher forcing,
        conditioned on ``z`` (default: ``mu(photo)``). Offsets of rows
        ``t < lengths-1`` and pen states of rows ``t < lengths`` count.
        Differentiable w.r.t. the parameters."""
        x = self._clean_padding(self._scale_in(stroke5), lengths)
        feats, mu, logvar = self.encode(photos)
        zz = self._latent(mu, logvar, z, "mean")
        params = self._decode(feats, zz, with_start_token(x)[:, :-1], temperature, pen_temperature)
        gmm_lp, pen_lp, _, _ = self._row_log_probs(params, x, lengths)
        return gmm_lp.sum(dim=1) + pen_lp.sum(dim=1)

    # ------------------------------------------------------------- sampling
    def sample(self, photos: Tensor, max_len: int | None = None, temperature: float = 1.0,
               greedy: bool = False, generator: torch.Generator | None = None,
               z: Tensor | None = None, pen_temperature: float | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw one sketch per photo, all photos in one batch.

        Returns ``(stroke5 (B, max_len, 5)`` raw units, no start token, padded
        with ``(0,0,0,0,1)`` after the end row; ``lengths (B,)`` long, rows
        incl. the end row; ``log_prob (B,)``)``. ``log_prob`` sums, over the
        generated rows, the marginal mixture log-density of the offset (rows
        before the end) and the pen-state log-probability, under the
        distribution actually sampled from (tempered). It carries gradients
        when called with grad enabled. ``greedy``: most likely mixture, its
        mean and the most likely pen state (log_prob is then that of those
        actions under the tempered model). A sequence still running at the
        last row is forced to end there. ``generator`` (on the photos' device)
        drives all randomness. ``pen_temperature`` (default: ``temperature``)
        tempers the pen-state logits alone; ``log_prob`` takes the same pair.
        """
        max_len = int(max_len or self.config.max_len)
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        feats, mu, logvar = self.encode(photos)
        zz = self._latent(mu, logvar, z, "mean")
        b, dev = feats.shape[0], feats.device
        h, c = self._initial_state(zz)
        keys = self.attention.keys(feats)
        x = feats.new_zeros(b, 5)
        x[:, 2] = 1.0
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        lengths = torch.full((b,), max_len, dtype=torch.long, device=dev)
        total_lp = feats.new_zeros(b)
        rows = feats.new_zeros(b, max_len, 5)
        rows[..., 4] = 1.0
        for t in range(max_len):
            out, _, h, c = self._step(x, zz, h, c, feats, keys)
            p = self._split_head(out, temperature, pen_temperature)
            pen_logp = F.log_softmax(p["pen_logits"], dim=-1)
            if greedy:
                pen = pen_logp.argmax(dim=-1)
            else:
                pen = torch.multinomial(pen_logp.detach().exp(), 1, generator=generator).squeeze(-1)
            if t == max_len - 1:
                pen = torch.full_like(pen, 2)
            # offset from the mixture
            pi_logp = F.log_softmax(p["pi_logits"], dim=-1)
            if greedy:
                k = pi_logp.argmax(dim=-1)
            else:
                k = torch.multinomial(pi_logp.detach().exp(), 1, generator=generator).squeeze(-1)
            sel = {n: p[n].detach().gather(-1, k.unsqueeze(-1)).squeeze(-1)
                   for n in ("mu_x", "mu_y", "sigma_x", "sigma_y", "rho")}
            if greedy:
                dx, dy = sel["mu_x"], sel["mu_y"]
            else:
                e = torch.randn((b, 2), generator=generator, device=dev, dtype=feats.dtype)
                dx = sel["mu_x"] + sel["sigma_x"] * e[:, 0]
                dy = sel["mu_y"] + sel["sigma_y"] * (
                    sel["rho"] * e[:, 0] + torch.sqrt((1 - sel["rho"] ** 2).clamp_min(0)) * e[:, 1])
            is_end = pen == 2
            dx = torch.where(is_end, torch.zeros_like(dx), dx)
            dy = torch.where(is_end, torch.zeros_like(dy), dy)
            off_lp = gmm_log_prob(dx, dy, p["pi_logits"], p["mu_x"], p["mu_y"],
                                  p["sigma_x"], p["sigma_y"], p["rho"])
            step_lp = pen_logp.gather(-1, pen.unsqueeze(-1)).squeeze(-1)
            step_lp = step_lp + torch.where(is_end, torch.zeros_like(off_lp), off_lp)
            active = ~done
            total_lp = total_lp + torch.where(active, step_lp, torch.zeros_like(step_lp))
            new_row = torch.cat([torch.stack([dx, dy], dim=-1), F.one_hot(pen, 3).to(dx.dtype)], -1)
            pad_row = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], device=dev, dtype=dx.dtype)
            row = torch.where(active.unsqueeze(-1), new_row.detach(), pad_row)
            rows[:, t] = row
            ends_now = active & is_end
            lengths = torch.where(ends_now, torch.full_like(lengths, t + 1), lengths)
            done = done | is_end
            x = row
            if bool(done.all()):
                break
        out_rows = torch.cat([rows[..., :2] * self.offset_scale, rows[..., 2:]], dim=-1)
        return out_rows, lengths, total_lp

    # ---------------------------------------------------------- conversion
    def to_stroke3(self, stroke5_batch: Tensor | np.ndarray, lengths: Tensor | Sequence[int]
                   ) -> list[np.ndarray]:
        """Raw-unit stroke-5 batch (``sample``'s format; no start token) ->
        list of float32 stroke-3 arrays ``(n, 3)`` (dx, dy, pen lifts after),
        rows before the end row only."""
        arr = (stroke5_batch.detach().cpu().numpy() if isinstance(stroke5_batch, Tensor)
               else np.asarray(stroke5_batch))
        lens = (lengths.detach().cpu().numpy() if isinstance(lengths, Tensor)
                else np.asarray(lengths)).astype(int)
        from sbir.strokes import stroke5_to_stroke3

        result = []
        for i in range(arr.shape[0]):
            s = arr[i, : max(int(lens[i]), 0)]
            result.append(stroke5_to_stroke3(s.astype(np.float32)))
        return result


# --------------------------------------------------------------------------
# a tiny training helper (tests / smoke runs; the real loop lives elsewhere)
# --------------------------------------------------------------------------


def train_on_strokes(
    sketches: Sequence[np.ndarray],
    steps: int,
    config: SketchGeneratorConfig | None = None,
    photos: Tensor | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    model: PhotoToSketchGenerator | None = None,
) -> tuple[PhotoToSketchGenerator, list[dict[str, float]]]:
    """Fit G on stroke-3 sketches with Adam for ``steps`` steps.

    ``photos``: one photo per sketch ``(N, C, H, W)`` or a single photo
    ``(C, H, W)`` used for all (default: a blank photo, i.e. unconditional).
    Sketches longer than ``config.max_len`` rows are dropped. The offset scale
    is set from the sketches (``sbir.strokes.stroke3_offset_std``).
    Returns the model and the per-step loss dicts (floats).
    """
    from sbir import strokes as S

    cfg = config or SketchGeneratorConfig()
    keep = [i for i, s in enumerate(sketches) if 0 < len(s) <= cfg.max_len]
    if not keep:
        raise ValueError(f"no sketch has 1..{cfg.max_len} points")
    data = [np.asarray(sketches[i], dtype=np.float32) for i in keep]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if model is None:
        model = PhotoToSketchGenerator(cfg)
        model.set_offset_scale(S.stroke3_offset_std(data))
    if photos is None:
        photos = torch.zeros(cfg.in_channels, cfg.image_size, cfg.image_size)
    photos = photos.float()
    per_sketch = photos.dim() == 4
    if per_sketch:
        photos = photos[keep]
    s5 = [S.stroke3_to_stroke5(s) for s in data]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history: list[dict[str, float]] = []
    for step in range(steps):
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        batch, lengths = S.pad_stroke5([s5[i] for i in idx], cfg.max_len)
        batch_t = torch.as_tensor(np.asarray(batch), dtype=torch.float32)
        lengths_t = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        ph = photos[torch.as_tensor(idx)] if per_sketch else photos.unsqueeze(0).expand(len(idx), -1, -1, -1)
        out = model.loss(ph, batch_t, lengths_t, step=step)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        model.clip_gradients()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    return model, history

"""StrokeNet: a 3-D ResNet-18 imaging encoder fused with per-feature clinical tokens.

Architecture (shapes for a batch of ``B`` cases on a ``D x H x W`` model grid, i.e. ``K x J x I``):

* **FLAIR absence.** When ``flair_present`` is False, the FLAIR channel (all zeros from
  preprocessing) is replaced by a learned constant (``flair_fill``), and a learned
  ``flair_absent`` embedding is added to every bottleneck token.
* **Imaging encoder.** A 3-D ResNet-18: a strided stem (optionally followed by max-pooling as in
  the original ResNet), then four stages of ``blocks`` basic residual blocks (2-2-2-2 for
  ResNet-18) with widths ``widths``; stages 2-4 halve the resolution. A small full-resolution
  convolution gives the decoder a skip at the input resolution.
* **Clinical encoder.** Each of the ten clinical features (:data:`StrokePredictorLib.clinical.FEATURES`)
  becomes its own token of ``fusion_dim`` numbers: a feature-identity embedding plus either a
  value embedding (numeric features: a per-feature affine map of the encoded value, a GELU and a
  shared linear layer; binary/categorical features: an embedding table) or a learned per-feature
  ``missing`` embedding. Attention over a single clinical vector would be degenerate (softmax over
  one key is always 1); ten tokens make the attention weights informative.
* **Bidirectional cross-attention fusion.** The bottleneck feature map is flattened into ``T``
  imaging tokens (plus a learned embedding of their normalised position). Imaging tokens attend
  to clinical tokens and clinical tokens attend to imaging tokens (``heads`` heads each); the
  imaging tokens, enriched with the pooled clinical context, are fused by a feed-forward layer
  into a ``fusion_dim``-d representation (256 in both presets) and added back to the bottleneck
  feature map.
* **Decoder.** U-Net style: upsample, concatenate the encoder skip of the same resolution,
  convolve; down to the full-resolution skip.
* **FiLM conditioning (``film=True``).** The fused clinical representation (the mean of the
  clinical tokens after their cross-attention over the image, ``context`` in the fusion, one
  ``fusion_dim`` vector per case) scales and shifts the output channels of every decoder level:
  ``h <- h * (1 + gamma) + beta`` with ``(gamma, beta) = Linear(context)`` per level
  (feature-wise linear modulation, Perez et al., AAAI 2018). Without it, the clinical values
  reach the decoder only through the bottleneck update of the fusion, and a network can (and
  the shipped ones did) learn to ignore that single path. FiLM gives the clinical values a
  direct, multiplicative hold on every resolution, including the full-resolution level that
  draws the lesion's border, which is where onset time and treatment act (how far the infarct
  grows into the tissue around the core).

  FiLM was tried first for the outcome task (zero-initialised, so it starts from the shipped
  weights' exact output, and it imposes no growth mechanism). Measured on the CPU (outcome model
  card, run film2): the clinical values moved the volume by 12-19 mL, but the growth between
  "no treatment at 20 h" and "thrombectomy at 1 h" stayed near 1.05x on the sample case and the
  orderings failed: 1,000 CPU steps do not teach a free-form conditioning of 61k parameters a
  monotone time and treatment effect.
* **Growth head (``growth=True``, the outcome model).** Imaging predicts the core and a ranking
  of the tissue around it; the clinical branch predicts how much of that tissue infarcts. Two
  1x1x1 heads read the same (Monte-Carlo dropped-out) features: ``core`` (the existing head) and
  ``risk``; the outcome logit is ``logaddexp(core, risk + s)``, where ``s`` is one number per
  case from :class:`_GrowthHead`: an additive model of the other clinical tokens plus a function
  of onset time that never decreases, minus the tissue saved by treatment, which is >= 0 and
  never increases with onset time. So, by construction and whatever the training, through ``s``
  a later onset never lowers the outcome probability of any voxel, treatment never raises it, and
  the voxel probabilities move monotonically with ``s``. In a growth network onset time and
  treatment reach the prediction through ``s`` alone: the cross-attention sees both as "missing"
  (their tokens are the learned missing embedding, so their attention weights say nothing about
  the case's values; their measured effects do). When they were also cross-attention tokens (run
  growth4) that second path broke the orderings: a missing treatment at 1 h gave 1.5 mL less than
  thrombectomy on the sample case although its ``s`` is not lower. So every voxel's probability
  now follows the orderings whatever the weights (the post-processing, which may use the
  Monte-Carlo spread, is checked by ``python -m Training behaviour``). Why this over FiLM: it
  states as structure what is known about infarct growth (it spreads from the core into tissue at
  risk; treatment saves tissue, less the later it comes), it has a few hundred clinical
  parameters instead of a conditioning of every decoder channel, and the offset ``s`` is an
  interpretable per-case number. It is built from weights without it with the risk head a copy
  of the old head minus 2 logits (:func:`load_weights`), i.e. starting a little above the old
  output (0.13 logits plus the starting offset: 0.15 on the shipped outcome weights). The
  imaging-only twin has the same heads with a learned constant ``s``. ``s`` reaches
  :meth:`StrokeNet.sample_logits` as one more channel of ``features`` (constant without the gate below), so the
  Monte-Carlo tail, the what-if cache and the post-processing are unchanged. Measured so far
  (outcome model card, runs growth1-4): when ``core`` is trained only through the combined
  output it learns to cover the final infarct itself and leaves ``s`` little to grow into; with
  ``core`` also supervised by the acute lesion and the growth parameters at a higher rate
  (growth4) the clinical values drive the growth (27 of 28 growing simulated cases >= 1.3x), but
  ``s`` does not know how large the core is, so small lesions grow by tens of millilitres (and a
  longer run, growth7, bought the large infarcts' full growth with false positives around the
  small ones). The optional **core-neighbourhood gate** (``growth_reach`` R > 0) subtracts
  ``softplus(w) * -log(m + 0.01)`` from ``s`` voxel by voxel, where ``m`` is the mean core
  probability in the ``(2R+1)^3`` cube around the voxel: growth stays open inside and beside a
  large core and is held back around a small one and far from any, as the simulation's growth
  scales with the core. It is local, so it means the same on a training patch as on the whole
  grid, and it reads only imaging, so the orderings above still hold for any weights.
  The cross-attention and its maps are unchanged and remain the explanation.
* **Growth by volume (``growth_volume=True``; runs g21-g28 of the outcome model card; shipped with
  ``growth_alone``).** Measured on
  validation data (outcome model card, g21): with the learned risk map, even a per-case *oracle*
  offset ``s`` gained only 0.02 Dice over the best constant one, so no clinical head could make
  a difference through it; growing a good acute core outward by a per-case distance could gain
  0.056. So in this mode there is no risk map: ``s`` is the log of the grown volume over the
  core's volume, and the outcome is the (deterministic) core grown outward through the tissue
  (ADC > 0; with ``growth_tissue_adc_max`` only the parenchyma, below that ADC, as the simulation's penumbra
  is grey and white matter and never CSF), nearest voxel first, by ``exp(s)`` times the core's volume. This is
  the mismatch model of infarct growth (the final infarct is the core plus the share of the surrounding
  tissue at risk that is lost, and that share scales with the core), it keeps every ordering of
  ``s`` above (a larger ``s`` grows a superset), and the core is the acute model's own head, so
  the outcome is as good as the acute segmentation allows. The growth channel carries at
  least +2 logits on the grown voxels and at most -2 on the others (-30 outside the tissue). It
  has no gradient with respect to ``s``: the growth head is fitted by regression of
  ``log(final / core volume)`` on simulated cases (``python -m Training fit-growth --volume``),
  not by end-to-end training. Which core grows: by default the deterministic core (probability
  >= ``growth_seed_probability``); an outcome bundle with a ``growth_seed`` block (``fit-growth
  --seed-reported``) grows the core the acute model *reports* instead, the Monte-Carlo mean,
  flip-averaged probability under the acute bundle's own threshold and component rules, passed as
  ``seed`` to :meth:`StrokeNet.growth_channel` by the predictor (runs g22/g23 of the outcome card: a
  weak core below the deterministic threshold grew nothing, so the outcome missed lesions the acute
  model reports; run g24, seeded so, has few empty outcomes but is level with its blind twin).
  With ``growth_alone`` the outcome is the grown core *alone*: the core head's Monte-Carlo samples
  are not added to it (``logaddexp``), so the core head's probability outside the reported core
  (sub-threshold evidence and false positives the acute block removed) does not reach the final
  infarct. Measured with a measuring patch before it was an option (outcome card, runs g25-g27):
  g24's bundles with it +0.004 over their twin; seeded from the acute model's score-optimal block
  (g27) +0.023 [+0.008, +0.045] Dice over the blind twin on 120 fresh cases; the shipped g28 (g27 with
  the predictor's fallback seed) +0.022 [+0.014, +0.030] on 480. The outcome is then
  deterministic given the seed: its interval is the post-processing's conformal margin alone.
* **Clinically blind (``clinical_blind=True``).** The ablation twin of a fusion network: the same
  weights, run as if every clinical value were missing (in the cross-attention and the growth
  head, whose offset is then its constant ``bias``), so no clinical information reaches the
  prediction. Unlike ``imaging_only`` it keeps the imaging path the fusion network was trained
  with, so the pair differs in the clinical values alone.
* **Head and Monte-Carlo dropout.** The last decoder features go through a 1x1x1 expansion
  (``head_channels``), **channel-wise dropout** (``nn.Dropout3d``, probability ``mc_dropout``) and
  a 1x1x1 convolution to one lesion logit per voxel. This is the network's only dropout, so
  everything before it is deterministic and computed once per case; Monte-Carlo sampling only
  re-samples the dropout masks of the tail (:meth:`StrokeNet.sample_logits`), which is a single
  small matrix product for all samples together. Channel-wise (not voxel-wise) dropout makes the
  samples differ coherently over space, so the per-sample lesion volumes spread meaningfully;
  the voxel-wise variance is the same as with voxel-wise dropout.

Outputs (:meth:`StrokeNet.forward`):

* ``logits`` ``(B, 1, D, H, W)``;
* ``feature_attention`` ``(B, 10)``: how much the imaging tokens attend to each clinical token,
  averaged over heads and imaging tokens (each row sums to 1; missing features are tokens too);
* ``spatial_attention`` ``(B, 1, D, H, W)``: how much the clinical tokens attend to each imaging
  location, averaged over heads and clinical tokens, upsampled (trilinear) to the input size and
  divided by its maximum, so that it lies in ``[0, 1]``.

With ``imaging_only`` the clinical tokens are ignored and fusion is skipped (ablation);
``feature_attention`` is then uniform (0.1 each) and ``spatial_attention`` is zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from StrokePredictorLib.clinical import FEATURES

N_CLINICAL = len(FEATURES)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
#: Settings of growth by volume alone: away from their defaults they need ``growth_volume``.
GROWTH_VOLUME_SETTINGS = ("growth_tissue_adc_max", "growth_seed_probability", "growth_alone")


@dataclass(frozen=True)
class NetworkConfig:
    """Width, depth and regularisation of :class:`StrokeNet` (saved in every bundle as JSON)."""

    in_channels: int = 3  # DWI, ADC, FLAIR (fixed by preprocessing)
    stem_channels: int = 16  # channels of the strided stem convolution
    stem_kernel: int = 3  # 7 in the original ResNet
    stem_stride: int = 2  # the stem halves the resolution
    stem_pool: bool = False  # ResNet max-pool (another factor 2) after the stem
    full_res_channels: int = 8  # full-resolution skip convolution (0: no full-resolution skip)
    widths: tuple[int, ...] = (16, 32, 64, 128)  # ResNet stage widths; stages 2.. halve resolution
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage: ResNet-18
    decoder_widths: tuple[int, ...] = (64, 32, 16, 8)  # one per skip level, deepest first
    decoder_convs: int = 1  # 3x3x3 convolutions per decoder level
    head_channels: int = 16  # 1x1x1 expansion before the Monte-Carlo dropout
    mc_dropout: float = 0.2  # channel-wise dropout before the 1x1x1 head (the MC-sampled tail)
    fusion_dim: int = 256  # width of clinical tokens, attention and the fused representation
    heads: int = 4  # attention heads (fusion_dim must be divisible by heads)
    ffn_mult: int = 2  # hidden width of the fusion feed-forward layer = ffn_mult * fusion_dim
    attention_dropout: float = 0.0  # dropout on attention weights, training only
    feature_dropout: float = 0.0  # training only: probability of marking a clinical feature missing
    imaging_only: bool = False  # ablation: clinical tokens ignored, fusion skipped
    film: bool = False  # FiLM: the fused clinical context scales/shifts every decoder level (zero-initialised)
    growth: bool = False  # growth head: a tissue-at-risk map shifted by a per-case clinical growth offset
    growth_reach: int = 0  # growth head: half-width (voxels) of the core neighbourhood that gates growth (0: none)
    growth_volume: bool = False  # growth head: grow the core outward by exp(s) x its volume (no risk map)
    clinical_blind: bool = False  # ablation twin: every clinical value treated as missing, a constant growth
    growth_tissue_adc_max: float = 0.0  # growth by volume: grow only where 0 < ADC < this (network units; 0: ADC > 0)
    growth_seed_probability: float = 0.5  # growth by volume: the core that grows is where its probability >= this
    growth_alone: bool = False  # growth by volume: the outcome is the grown core alone (no core-head samples added)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        object.__setattr__(self, "decoder_widths", tuple(int(w) for w in self.decoder_widths))
        if len(self.widths) != len(self.blocks) or len(self.widths) < 2:
            raise ValueError("NetworkConfig: widths and blocks need the same length (at least 2 stages).")
        if len(self.decoder_widths) != self.n_skips:
            raise ValueError(
                f"NetworkConfig: decoder_widths needs {self.n_skips} entries (one per skip level), "
                f"got {len(self.decoder_widths)}."
            )
        if self.fusion_dim % self.heads:
            raise ValueError(f"NetworkConfig: fusion_dim {self.fusion_dim} is not divisible by heads {self.heads}.")
        if not 0.0 <= self.mc_dropout < 1.0:
            raise ValueError(f"NetworkConfig: mc_dropout must lie in [0, 1), got {self.mc_dropout}.")
        if self.growth_reach < 0 or (self.growth_reach and not self.growth):
            raise ValueError(f"NetworkConfig: growth_reach must be >= 0 and needs growth, got {self.growth_reach}.")
        if self.growth_volume and (not self.growth or self.growth_reach):
            raise ValueError("NetworkConfig: growth_volume needs growth and replaces growth_reach.")
        if self.growth_tissue_adc_max < 0:
            raise ValueError(f"NetworkConfig: growth_tissue_adc_max must be >= 0, got {self.growth_tissue_adc_max}.")
        if not 0.0 < self.growth_seed_probability < 1.0:
            raise ValueError(f"NetworkConfig: growth_seed_probability must lie in (0, 1), got "
                             f"{self.growth_seed_probability}.")
        defaults = {f.name: f.default for f in fields(self)}
        moved = [name for name in GROWTH_VOLUME_SETTINGS if getattr(self, name) != defaults[name]]
        if moved and not self.growth_volume:
            raise ValueError(f"NetworkConfig: {', '.join(moved)} set away from the default needs growth_volume.")
        if self.clinical_blind and self.imaging_only:
            raise ValueError("NetworkConfig: clinical_blind keeps the clinical branch; it excludes imaging_only.")
        if self.film and self.imaging_only:
            raise ValueError("NetworkConfig: film needs the clinical branch; it cannot be combined with imaging_only.")

    # -- derived ---------------------------------------------------------------------------
    @property
    def n_skips(self) -> int:
        """Number of decoder levels (skip connections), full resolution included."""
        return int(self.full_res_channels > 0) + int(self.stem_pool) + len(self.widths) - 1

    @property
    def size_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return self.stem_stride * (2 if self.stem_pool else 1) * 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("widths", "blocks", "decoder_widths"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> NetworkConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error (they mean another version)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"NetworkConfig: unknown field(s) {', '.join(sorted(unknown))}.")
        return cls(**data)

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def lite(cls, **overrides: object) -> NetworkConfig:
        """The bundled, CPU-friendly model (about 3.6M parameters; size divisor 16).

        Meant for the 96 x 112 x 80 voxel grid (i, j, k) at 2 mm.
        """
        values: dict = dict(
            stem_channels=16, stem_kernel=3, stem_stride=2, stem_pool=False, full_res_channels=8,
            widths=(16, 32, 64, 128), blocks=(2, 2, 2, 2), decoder_widths=(64, 32, 16, 8), decoder_convs=1,
            head_channels=16, mc_dropout=0.2, fusion_dim=256, heads=4, ffn_mult=2, feature_dropout=0.1,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def base(cls, **overrides: object) -> NetworkConfig:
        """The research configuration (about 18.5M parameters; 3 x 128 x 128 x 128 input; divisor 32).

        A ResNet-18 with a 7x7x7 stem and max-pooling, as in the original, stage widths 40-320.
        """
        values: dict = dict(
            stem_channels=40, stem_kernel=7, stem_stride=2, stem_pool=True, full_res_channels=16,
            widths=(40, 80, 160, 320), blocks=(2, 2, 2, 2), decoder_widths=(176, 88, 40, 32, 16), decoder_convs=2,
            head_channels=32, mc_dropout=0.2, fusion_dim=256, heads=4, ffn_mult=2, feature_dropout=0.1,
        )
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------
def _conv_norm_act(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.InstanceNorm3d(out_ch, affine=True),
    ]
    if act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3x3 convolutions with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(in_ch, out_ch, 3, stride)
        self.conv2 = _conv_norm_act(out_ch, out_ch, 3, 1, act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = _conv_norm_act(in_ch, out_ch, 1, stride, act=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class _ResNetEncoder(nn.Module):
    """3-D ResNet encoder. Returns the skip features (full resolution first) and the bottleneck."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        c = config
        self.full = _conv_norm_act(c.in_channels, c.full_res_channels) if c.full_res_channels > 0 else None
        self.stem = _conv_norm_act(c.in_channels, c.stem_channels, c.stem_kernel, c.stem_stride)
        self.pool = nn.MaxPool3d(3, stride=2, padding=1) if c.stem_pool else None
        stages = []
        in_ch = c.stem_channels
        for index, (width, count) in enumerate(zip(c.widths, c.blocks)):  # noqa: B905
            stride = 1 if index == 0 else 2
            blocks = [_BasicBlock(in_ch, width, stride)] + [_BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)

    def skip_channels(self, config: NetworkConfig) -> list[int]:
        """Channels of the skips returned by :meth:`forward`, full resolution first."""
        channels = [config.full_res_channels] if config.full_res_channels > 0 else []
        if config.stem_pool:
            channels.append(config.stem_channels)
        channels.extend(config.widths[:-1])
        return channels

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = [self.full(x)] if self.full is not None else []
        h = self.stem(x)
        if self.pool is not None:
            skips.append(h)
            h = self.pool(h)
        for stage in self.stages[:-1]:
            h = stage(h)
            skips.append(h)
        return skips, self.stages[-1](h)


class _ClinicalEncoder(nn.Module):
    """One token per clinical feature: identity + (value embedding or learned missing embedding).

    Input: values (B, 10) float32 as produced by :func:`StrokePredictorLib.clinical.encode`
    (numeric features normalised, binary/categorical features as category index), missing (B, 10) bool.
    Output: tokens (B, 10, dim).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.numeric = [i for i, f in enumerate(FEATURES) if f.kind in ("continuous", "ordinal")]
        self.categorical = [i for i, f in enumerate(FEATURES) if f.kind in ("binary", "categorical")]
        cardinalities = [len(FEATURES[i].categories) for i in self.categorical]
        offsets = [0]
        for count in cardinalities[:-1]:
            offsets.append(offsets[-1] + count)
        self.register_buffer("cat_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("cat_max", torch.tensor(cardinalities, dtype=torch.long) - 1, persistent=False)
        self.identity = nn.Parameter(torch.randn(N_CLINICAL, dim) * 0.02)
        self.missing = nn.Parameter(torch.randn(N_CLINICAL, dim) * 0.02)
        self.value_weight = nn.Parameter(torch.randn(len(self.numeric), dim))
        self.value_bias = nn.Parameter(torch.randn(len(self.numeric), dim) * 0.1)
        self.value_proj = nn.Linear(dim, dim)
        self.category = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.category.weight, std=0.5)
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        batch = values.shape[0]
        dim = self.identity.shape[1]
        present = torch.zeros(batch, N_CLINICAL, dim, dtype=self.identity.dtype, device=values.device)
        numeric = values[:, self.numeric].to(self.value_weight.dtype)
        embedded = F.gelu(numeric[..., None] * self.value_weight + self.value_bias)
        present[:, self.numeric] = self.value_proj(embedded).to(present.dtype)
        index = torch.round(values[:, self.categorical]).long()
        index = torch.minimum(index.clamp(min=0), self.cat_max) + self.cat_offsets
        present[:, self.categorical] = self.category(index).to(present.dtype)
        tokens = torch.where(missing[..., None], self.missing.expand(batch, -1, -1), present)
        return self.norm(tokens + self.identity)


class _CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``context`` tokens that returns its weights.

    Shapes: query (B, Tq, dim), context (B, Tk, dim) -> (output (B, Tq, dim), weights (B, heads, Tq, Tk)).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_q, dim = query.shape
        n_k = context.shape[1]
        head_dim = dim // self.heads
        q = self.q(self.norm_q(query)).view(batch, n_q, self.heads, head_dim).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).view(batch, n_k, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)).float() / math.sqrt(head_dim), dim=-1)
        attended = self.dropout(weights).to(v.dtype) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, n_q, dim)), weights


class _Fusion(nn.Module):
    """Bidirectional cross-attention between bottleneck imaging tokens and clinical tokens.

    Input: bottleneck (B, C, d, h, w), clinical tokens (B, 10, dim), flair_present (B,).
    Output: fused bottleneck (B, C, d, h, w), imaging->clinical weights (B, heads, T, 10),
    clinical->imaging weights (B, heads, 10, T), with T = d*h*w, and the fused clinical
    representation (B, dim): the mean of the clinical tokens after their cross-attention.
    """

    def __init__(self, channels: int, config: NetworkConfig) -> None:
        super().__init__()
        dim = config.fusion_dim
        self.to_tokens = nn.Linear(channels, dim)
        self.position = nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))
        self.flair_absent = nn.Parameter(torch.randn(dim) * 0.02)
        self.image_to_clinical = _CrossAttention(dim, config.heads, config.attention_dropout)
        self.clinical_to_image = _CrossAttention(dim, config.heads, config.attention_dropout)
        self.fuse_norm = nn.LayerNorm(2 * dim)
        self.fuse = nn.Sequential(
            nn.Linear(2 * dim, config.ffn_mult * dim), nn.GELU(), nn.Linear(config.ffn_mult * dim, dim)
        )
        self.from_tokens = nn.Linear(dim, channels)

    @staticmethod
    def _coordinates(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                     window: torch.Tensor | None = None) -> torch.Tensor:
        """Token positions in [-1, 1] over the whole model grid: (T, 3), or (B, T, 3) with ``window``.

        ``window`` (B, 2, 3): per sample, the patch's first cell and the whole grid's size, both in
        bottleneck cells (k, j, i). A patch's tokens then get the positions they have in a full-grid
        forward pass, so training on patches does not change what a position means.
        """
        if window is None:
            axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else
                    torch.zeros(1, device=device, dtype=dtype) for n in shape]
            return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        window = window.to(device=device, dtype=torch.float32)
        start, full = window[:, 0], window[:, 1]  # (B, 3)
        cells = torch.stack(torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in shape),
                                           indexing="ij"), dim=-1).reshape(1, -1, 3)  # (1, T, 3)
        position = start[:, None, :] + cells
        scaled = torch.where(full[:, None, :] > 1, 2.0 * position / (full[:, None, :] - 1).clamp(min=1) - 1.0,
                             torch.zeros_like(position))
        return scaled.to(dtype)

    def forward(
        self, bottleneck: torch.Tensor, clinical: torch.Tensor, flair_present: torch.Tensor,
        window: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, channels, d, h, w = bottleneck.shape
        flat = bottleneck.flatten(2).transpose(1, 2)  # (B, T, C)
        tokens = self.to_tokens(flat)
        position = self.position(self._coordinates((d, h, w), tokens.device, tokens.dtype, window))
        tokens = tokens + (position[None] if window is None else position)
        absent = (~flair_present).to(tokens.dtype)[:, None, None]
        tokens = tokens + absent * self.flair_absent
        clinical = clinical.to(tokens.dtype)
        image_out, weights_ic = self.image_to_clinical(tokens, clinical)
        clinical_out, weights_ci = self.clinical_to_image(clinical, tokens)
        tokens = tokens + image_out
        pooled = (clinical + clinical_out).mean(dim=1, keepdim=True)  # (B, 1, dim)
        context = pooled.expand(-1, tokens.shape[1], -1)
        fused = tokens + self.fuse(self.fuse_norm(torch.cat([tokens, context], dim=-1)))  # (B, T, dim)
        update = self.from_tokens(fused).transpose(1, 2).reshape(batch, channels, d, h, w)
        return bottleneck + update.to(bottleneck.dtype), weights_ic, weights_ci, pooled[:, 0]


class _FiLM(nn.Module):
    """Feature-wise affine conditioning of one decoder level by the fused clinical context.

    ``x (B, C, D, H, W), context (B, dim) -> x * (1 + gamma) + beta`` with ``gamma, beta`` (B, C)
    from one linear layer. Zero-initialised: the identity until trained.
    """

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.linear(context.to(self.linear.weight.dtype)).to(x.dtype).chunk(2, dim=1)
        return x * (1.0 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]


#: Knots (hours from onset to imaging) of the growth head's monotone time functions.
GROWTH_KNOTS_H = (0.5, 1.0, 2.0, 3.0, 4.5, 6.0, 9.0, 12.0, 18.0, 24.0, 36.0)
#: Gain of the growth head's scalar parameters: AdamW moves a parameter by about ``lr`` per step
#: whatever its gradient, so a handful of scalars that must travel several logits in a few
#: thousand CPU steps are stored divided by this gain.
GROWTH_GAIN = 10.0
#: Growth by volume: the largest grown volume as a multiple of the core's (the simulation's mismatch is at most 6),
#: and the growth channel's value (logits) where nothing may grow.
MAX_GROWTH = 8.0
GROWTH_FAR = 30.0


@functools.lru_cache(maxsize=4)
def _tie_pattern(shape: tuple[int, ...]) -> np.ndarray:
    """A fixed pattern in [0, 0.01) (seeded, left-right symmetric along the last axis) that breaks
    distance ties of growth by volume without favouring a side."""
    noise = np.random.default_rng(20221204).random(shape, dtype=np.float32)
    return (0.005 * (noise + noise[..., ::-1])).astype(np.float32)


_ONSET = next(i for i, f in enumerate(FEATURES) if f.name == "onset_to_imaging_h")
_TREATMENT = next(i for i, f in enumerate(FEATURES) if f.name == "treatment")
_THROMBECTOMY = FEATURES[_TREATMENT].categories.index("thrombectomy")  # index into (none, ...) of saved


class _GrowthHead(nn.Module):
    """Per-case growth offset ``s`` (logits) of the outcome, from the clinical values.

    ``s = bias + sum_f g(token_f) + u(t) - b_T(t)`` with

    * ``g``: one small MLP applied to the token of every clinical feature other than onset time
      and treatment, summed over features (an additive model: each feature's share is its own);
    * ``u(t) = sum_k softplus(a_k) * sigma_k(t)``: growth with onset-to-imaging time ``t``,
      non-decreasing by construction (``sigma_k`` are logistic steps in log time at
      :data:`GROWTH_KNOTS_H`);
    * ``b_T(t) = sum_k softplus(c_Tk) * (1 - sigma_k(t))``: the tissue saved by treatment ``T``,
      >= 0 and non-increasing in ``t`` (treatment saves less the later it comes), 0 for "none";
      a missing treatment gets the average of the four, with learned weights, capped at what
      thrombectomy saves (so it lies between no treatment and thrombectomy: growth4 learned a
      larger early benefit for thrombolysis, and an uncapped average fell below thrombectomy);
      a missing onset time a learned one.

    Without clinical input (the imaging-only twin) ``s`` is the learned ``bias`` alone. The shares
    ``g(token_f)`` are returned by :meth:`terms` (and as ``growth_terms`` by the network), so that
    training can hold them to what the data support (``train-synth --growth-l2``, a ridge penalty).
    """

    def __init__(self, dim: int, clinical: bool, reach: bool = False) -> None:
        super().__init__()
        knots = len(GROWTH_KNOTS_H)
        self.bias = nn.Parameter(torch.zeros(()))
        # weight of the core-neighbourhood gate (StrokeNet._near_core), stored divided by the gain;
        # softplus(-3) = 0.05: the gate starts almost open, so growth weights without it start near their output
        self.reach = nn.Parameter(torch.tensor(-3.0 / GROWTH_GAIN)) if reach else None
        self.clinical = clinical
        if clinical:
            self.additive = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 1))
            nn.init.zeros_(self.additive[2].weight)
            nn.init.zeros_(self.additive[2].bias)
            start = -3.0 / GROWTH_GAIN  # softplus(-3) = 0.05 logits per knot: a near-neutral start
            self.untreated = nn.Parameter(torch.full((knots,), start))
            self.benefit = nn.Parameter(torch.full((3, knots), start))
            self.missing_onset = nn.Parameter(torch.tensor(math.log(math.expm1(4.0)) / GROWTH_GAIN))
            self.missing_treatment = nn.Parameter(torch.zeros(4))
            self.register_buffer("log_knots", torch.log(torch.tensor(GROWTH_KNOTS_H) + 0.25), persistent=False)
            self.others = [i for i in range(N_CLINICAL) if i not in (_ONSET, _TREATMENT)]
            feature_ = FEATURES[_ONSET]
            self.onset_center, self.onset_scale = float(feature_.center), float(feature_.scale)

    def terms(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each clinical feature's additive share ``g(token_f)`` of ``s`` (B, 8: every feature but onset
        time and treatment, in schema order)."""
        return self.additive(tokens[:, self.others].float()).squeeze(-1)

    def forward(self, tokens: torch.Tensor | None, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        gain = GROWTH_GAIN
        bias = gain * self.bias.float()
        if not self.clinical or tokens is None:
            return bias.expand(values.shape[0])
        additive = self.terms(tokens).sum(dim=1)
        onset = (values[:, _ONSET].float() * self.onset_scale + self.onset_center).clamp(min=0.0)
        onset = torch.where(missing[:, _ONSET], F.softplus(gain * self.missing_onset.float()).expand_as(onset), onset)
        later = torch.sigmoid((torch.log(onset + 0.25)[:, None] - self.log_knots) / 0.3)  # (B, K), rises with t
        growth = (F.softplus(gain * self.untreated.float()) * later).sum(dim=1)
        saved = (F.softplus(gain * self.benefit.float())[None] * (1.0 - later)[:, None]).sum(dim=-1)  # (B, 3)
        saved = torch.cat([torch.zeros_like(saved[:, :1]), saved], dim=1)  # (B, 4): none saves nothing
        index = torch.round(values[:, _TREATMENT]).long().clamp(0, 3)
        chosen = saved.gather(1, index[:, None])[:, 0]
        mixed = (torch.softmax(self.missing_treatment.float(), dim=0) * saved).sum(dim=1)
        # a treatment that is not known saves no more than thrombectomy would
        mixed = torch.minimum(mixed, saved[:, _THROMBECTOMY])
        saved = torch.where(missing[:, _TREATMENT], mixed, chosen)
        return bias + additive + growth - saved


class _DecoderLevel(nn.Module):
    """Upsample x2, concatenate the skip, convolve.

    Without gradients (inference) the first convolution of the concatenation is computed as the sum
    of its two halves' convolutions (the weights split by input channel): the same function and
    parameters, without building the concatenated tensor, which at full resolution costs about a
    fifth of the level's time on a CPU. Training keeps the concatenation: there the two backward
    passes cost more than the copy (a CPU training step took ~5% longer split)."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, convs: int) -> None:
        super().__init__()
        layers = [_conv_norm_act(in_ch + skip_ch, out_ch)]
        layers += [_conv_norm_act(out_ch, out_ch) for _ in range(convs - 1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        if torch.is_grad_enabled():
            return self.convs(torch.cat([x, skip.to(x.dtype)], dim=1))
        first = self.convs[0]
        conv = first[0]
        channels = x.shape[1]
        h = (F.conv3d(x, conv.weight[:, :channels], conv.bias, conv.stride, conv.padding)
             + F.conv3d(skip.to(x.dtype), conv.weight[:, channels:], None, conv.stride, conv.padding))
        return self.convs[1:](first[1:](h))  # the first block's norm and activation, then the other blocks


# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------
@dataclass
class ImagingFeatures:
    """Output of :meth:`StrokeNet.encode_image`: everything that depends on the images only.

    Attributes:
        skips: encoder skips, full resolution first (B, C_l, ...).
        bottleneck: (B, C, d, h, w) before the clinical fusion.
        flair_present: (B,) bool.
        size: the input's spatial size (D, H, W).
    """

    skips: list[torch.Tensor]
    bottleneck: torch.Tensor
    flair_present: torch.Tensor
    size: tuple[int, ...]
    tissue: torch.Tensor | None = None  # (B, D, H, W) bool: where growth by volume may reach (ADC > 0, below
    # growth_tissue_adc_max when set)


class StrokeNet(nn.Module):
    """Clinical-imaging fusion network for acute stroke lesion segmentation.

    Args:
        config: widths, depth and dropout; :meth:`NetworkConfig.lite` or :meth:`NetworkConfig.base`.

    Attributes:
        size_divisor: every spatial input size must be a multiple of it.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetworkConfig.lite()
        c = self.config
        self.size_divisor: int = c.size_divisor
        self.flair_fill = nn.Parameter(torch.tensor(-1.0))
        self.encoder = _ResNetEncoder(c)
        skips = self.encoder.skip_channels(c)
        if len(skips) != len(c.decoder_widths):  # pragma: no cover - guarded by NetworkConfig
            raise ValueError("decoder_widths does not match the encoder's skip levels.")
        self.clinical = None if c.imaging_only else _ClinicalEncoder(c.fusion_dim)
        self.fusion = None if c.imaging_only else _Fusion(c.widths[-1], c)
        levels = []
        in_ch = c.widths[-1]
        for skip_ch, out_ch in zip(reversed(skips), c.decoder_widths):  # noqa: B905
            levels.append(_DecoderLevel(in_ch, skip_ch, out_ch, c.decoder_convs))
            in_ch = out_ch
        self.decoder = nn.ModuleList(levels)
        self.film = (nn.ModuleList(_FiLM(c.fusion_dim, w) for w in c.decoder_widths) if c.film else None)
        self.expand = nn.Sequential(nn.Conv3d(in_ch, c.head_channels, 1), nn.LeakyReLU(0.01, inplace=True))
        self.mc_dropout = nn.Dropout3d(c.mc_dropout)
        self.head = nn.Conv3d(c.head_channels, 1, 1)
        # growth head: a second 1x1x1 head (tissue at risk) and the per-case offset from the clinical values
        self.risk = nn.Conv3d(c.head_channels, 1, 1) if c.growth and not c.growth_volume else None
        self.growth = (_GrowthHead(c.fusion_dim, clinical=not (c.imaging_only or c.clinical_blind),
                                   reach=c.growth_reach > 0) if c.growth else None)

    # -- pieces ------------------------------------------------------------------------------
    @property
    def offset_features(self) -> tuple[str, ...]:
        """Clinical features that reach the prediction only through the growth offset ``s`` (onset
        time and treatment in a growth network with clinical input; none otherwise): the
        cross-attention sees them as missing, so their attention weights do not depend on them."""
        if self.growth is None or self.clinical is None or self.config.clinical_blind:
            return ()
        return (FEATURES[_ONSET].name, FEATURES[_TREATMENT].name)

    def seen_missing(self, missing: torch.Tensor) -> torch.Tensor:
        """The missing flags the network acts on: all True for a clinically blind twin (no clinical
        value reaches its prediction), ``missing`` otherwise."""
        return torch.ones_like(missing) if self.config.clinical_blind else missing

    def check_input(self, image: torch.Tensor) -> None:
        """Raise ValueError unless ``image`` is (B, 3, D, H, W) with sizes divisible by :attr:`size_divisor`."""
        if image.ndim != 5 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"StrokeNet expects (B, {self.config.in_channels}, D, H, W), got {tuple(image.shape)}.")
        bad = [s for s in image.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"StrokeNet: spatial size {tuple(image.shape[2:])} must be divisible by {self.size_divisor}."
            )

    def encode_image(self, image: torch.Tensor, flair_present: torch.Tensor) -> ImagingFeatures:
        """The imaging encoder alone (no clinical input): what a what-if re-run can keep.

        Args:
            image: (B, 3, D, H, W), see :meth:`forward`.
            flair_present: (B,) bool.

        Returns:
            :class:`ImagingFeatures`: the encoder skips and the bottleneck before fusion.
        """
        self.check_input(image)
        batch = image.shape[0]
        flair_present = flair_present.to(device=image.device, dtype=torch.bool).reshape(batch)
        fill = self.flair_fill.to(image.dtype).expand_as(image[:, 2])
        flair = torch.where(flair_present[:, None, None, None], image[:, 2], fill)
        x = torch.cat([image[:, :2], flair[:, None]], dim=1)
        skips, bottleneck = self.encoder(x)
        tissue = image[:, 1] > 0
        if self.config.growth_tissue_adc_max:  # parenchyma: no CSF for the growth to reach
            tissue &= image[:, 1] < self.config.growth_tissue_adc_max
        return ImagingFeatures(skips, bottleneck, flair_present, tuple(image.shape[2:]), tissue)

    def decode(
        self,
        encoded: ImagingFeatures,
        clinical_values: torch.Tensor,
        clinical_missing: torch.Tensor,
        window: torch.Tensor | None = None,
        grow: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Everything that depends on the clinical values: fusion, decoder (with FiLM) and the
        1x1x1 expansion, from the cached :meth:`encode_image` output. Arguments and returns as
        in :meth:`features`. With ``grow`` False a growth network's ``features`` come without the
        growth channel, for a caller that appends its own (:meth:`growth_channel` with a ``seed``:
        the predictor seeds growth by volume from the core it reports)."""
        skips, bottleneck, flair_present = encoded.skips, encoded.bottleneck, encoded.flair_present
        size = encoded.size
        batch = bottleneck.shape[0]
        device = bottleneck.device
        context = None
        tokens = None
        missing = self.seen_missing(clinical_missing.to(device=device, dtype=torch.bool))
        if self.fusion is not None and self.clinical is not None:
            if self.training and self.config.feature_dropout > 0:
                drop = torch.rand(missing.shape, device=missing.device) < self.config.feature_dropout
                missing = missing | drop
            attended = missing
            if self.offset_features:  # onset time and treatment act through the growth offset alone
                attended = missing.clone()
                attended[:, [_ONSET, _TREATMENT]] = True
            tokens = self.clinical(clinical_values.to(device=device, dtype=torch.float32), attended)
            cells = None
            if window is not None:
                stride = torch.tensor(size, device=device) // torch.tensor(bottleneck.shape[2:], device=device)
                window = window.to(device=device, dtype=torch.long)
                if bool((window % stride).any()):
                    raise ValueError(f"window {window.tolist()} must be a multiple of the encoder stride "
                                     f"{stride.tolist()}.")
                cells = window // stride
            bottleneck, weights_ic, weights_ci, context = self.fusion(bottleneck, tokens, flair_present, cells)
            feature_attention = weights_ic.float().mean(dim=(1, 2))  # (B, 10)
            spatial = weights_ci.float().mean(dim=(1, 2)).reshape(batch, 1, *bottleneck.shape[2:])
            spatial = F.interpolate(spatial, size=size, mode="trilinear", align_corners=False)
            spatial = spatial / spatial.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
        else:
            feature_attention = torch.full((batch, N_CLINICAL), 1.0 / N_CLINICAL, device=device)
            spatial = torch.zeros(batch, 1, *size, device=device)
        h = bottleneck
        for index, (level, skip) in enumerate(zip(self.decoder, reversed(skips))):  # noqa: B905
            h = level(h, skip)
            if self.film is not None and context is not None:
                h = self.film[index](h, context)
        features = self.expand(h)
        if self.growth is not None and grow:  # the case's growth offset rides along as a last channel
            features = torch.cat([features, self.growth_channel(features, tokens, clinical_values, missing,
                                                                encoded.tissue)], dim=1)
        out = {
            "features": features,
            "feature_attention": feature_attention,
            "spatial_attention": spatial.clamp(0.0, 1.0),
        }
        if self.growth is not None:
            out["clinical_tokens"] = tokens  # what growth_channel needs to re-run without the decoder
        if self.growth is not None and self.growth.clinical and tokens is not None:
            out["growth_terms"] = self.growth.terms(tokens)  # for training's penalty on them (train-synth)
        return out

    def features(
        self,
        image: torch.Tensor,
        clinical_values: torch.Tensor,
        clinical_missing: torch.Tensor,
        flair_present: torch.Tensor,
        window: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Everything before the Monte-Carlo dropout (deterministic in eval mode):
        :meth:`encode_image` then :meth:`decode`.

        ``window`` (B, 2, 3) int, optional: for a patch of the model grid, its first voxel and the
        whole grid's size (k, j, i), each a multiple of :attr:`size_divisor`; the fusion's position
        embedding then treats the patch as the part of the full grid it is (see :meth:`forward`).

        Returns:
            ``features`` (B, head_channels, D, H, W) (the input of the dropout and 1x1x1 head),
            ``feature_attention`` (B, 10) and ``spatial_attention`` (B, 1, D, H, W), as in :meth:`forward`.
        """
        return self.decode(self.encode_image(image, flair_present), clinical_values, clinical_missing, window)

    def growth_channel(self, features: torch.Tensor, tokens: torch.Tensor | None, clinical_values: torch.Tensor,
                       clinical_missing: torch.Tensor, tissue: torch.Tensor | None = None,
                       seed: torch.Tensor | None = None) -> torch.Tensor:
        """The growth offset channel that :meth:`decode` appends to ``features`` (B, head_channels,
        D, H, W; without that channel): the per-case offset ``s`` from the clinical tokens
        (``decode``'s ``clinical_tokens``) and values, minus the core-neighbourhood gate when the
        network has one. The tokens do not depend on :attr:`offset_features` (the cross-attention
        sees them as missing), so for clinical values that differ only there, the decoder's
        features and tokens can be kept and only this re-run: that is what a what-if change of
        onset time or treatment costs. With ``growth_volume`` the channel is the grown core's
        (:meth:`_grown_core`; ``tissue``, (B, D, H, W) bool, is where it may grow: everywhere when
        None; ``seed``, (B, D, H, W) bool, the core that grows, instead of the deterministic core).
        Returns (B, 1, D, H, W) in ``features``' dtype."""
        if self.growth is None:
            raise ValueError("growth_channel: this network has no growth head.")
        batch = features.shape[0]
        missing = self.seen_missing(clinical_missing.to(device=features.device, dtype=torch.bool))
        offset = self.growth(tokens, clinical_values.to(device=features.device, dtype=torch.float32), missing)
        if self.config.growth_volume:
            return self._grown_core(features, offset, tissue, seed).to(features.dtype)
        if seed is not None:
            raise ValueError("growth_channel: a seed is only for growth by volume (growth_volume).")
        offset = offset.to(features.dtype).reshape(batch, 1, 1, 1, 1).expand(-1, 1, *features.shape[2:])
        if self.config.growth_reach:  # minus the gate: growth only near enough core
            offset = offset - self._near_core(features).to(features.dtype)
        return offset

    def _grown_core(self, features: torch.Tensor, offset: torch.Tensor, tissue: torch.Tensor | None,
                    seed: torch.Tensor | None = None) -> torch.Tensor:
        """Growth by volume: per case, the core inside ``tissue`` (``seed`` when given: the core the predictor
        reports, see :attr:`StrokePredictorLib.bundle.Bundle.growth_seed`; else the deterministic core,
        probability >= ``growth_seed_probability``, 0.5 by default)
        grown outward through the tissue, nearest voxel first (Euclidean distance in voxels; ties
        broken by a fixed left-right symmetric pattern, so the grown volume is exact and both
        views of flip averaging agree), until the grown part holds ``exp(s)`` times the core's
        voxels (at most :data:`MAX_GROWTH` times). Returns (B, 1, D, H, W) float32 logits:
        ``2 + 2 (d* - d)`` on the grown voxels (``d*`` the distance reached), ``-2 - 2 (d - d*)``
        elsewhere in the tissue, -30 outside it and everywhere when there is no core."""
        from scipy import ndimage

        seed_logit = math.log(self.config.growth_seed_probability / (1.0 - self.config.growth_seed_probability))
        with torch.no_grad():
            if seed is None:
                core = (self.head(features).float() >= seed_logit)[:, 0].cpu().numpy()
            else:
                core = torch.as_tensor(seed).to(torch.bool).cpu().numpy().reshape(
                    (features.shape[0], *features.shape[2:]))
            where = (np.ones_like(core) if tissue is None else tissue.to(torch.bool).cpu().numpy().reshape(core.shape))
            ties = _tie_pattern(core.shape[1:])
            grown = np.full(core.shape, -GROWTH_FAR, np.float32)
            for b, share in enumerate(torch.exp(offset.float()).clamp(max=MAX_GROWTH).cpu().numpy()):
                seed = core[b] & where[b]
                if not seed.any():
                    continue
                distance = ndimage.distance_transform_edt(~seed).astype(np.float32)
                candidates = np.flatnonzero(where[b] & ~seed)
                wanted = min(int(round(float(share) * int(seed.sum()))), candidates.size)
                taken = seed.copy()
                reach = 0.0
                if wanted >= 1:
                    key = distance.ravel()[candidates] + ties.ravel()[candidates]
                    chosen = candidates[np.argpartition(key, wanted - 1)[:wanted]]
                    taken.flat[chosen] = True
                    reach = float(distance.ravel()[chosen].max())
                logits = np.where(taken, 2.0 + 2.0 * (reach - distance), -2.0 - 2.0 * np.maximum(distance - reach, 0.0))
                grown[b] = np.where(where[b], logits, -GROWTH_FAR)
        return torch.from_numpy(grown)[:, None].to(features.device)

    def _near_core(self, features: torch.Tensor) -> torch.Tensor:
        """The growth gate (logits >= 0, subtracted from the offset ``s``):
        ``softplus(w) * -log(m + 0.01)``, where ``m`` is the mean deterministic core probability in a
        cube of ``2 growth_reach + 1`` voxels around each voxel (separable box filter, padding not
        counted). Far from any core ``m`` is 0 and growth is held back by up to ``4.6 softplus(w)``
        logits; inside a large core ``m`` is near 1 and the gate is open; around a small core
        partly. So the tissue that can grow scales with the core's extent, as in the simulation,
        where a small core grows by little. It reads the core without gradient (the core head
        learns the acute lesion, the gate its use) and does not depend on the clinical values, so
        the orderings in ``s`` hold as before."""
        reach = self.config.growth_reach
        with torch.no_grad():
            m = torch.sigmoid(self.head(features).float())
            for kernel in ((2 * reach + 1, 1, 1), (1, 2 * reach + 1, 1), (1, 1, 2 * reach + 1)):
                m = F.avg_pool3d(m, kernel, stride=1, padding=tuple(k // 2 for k in kernel), count_include_pad=False)
            distance = -torch.log(m + 0.01)
        return F.softplus(GROWTH_GAIN * self.growth.reach.float()) * distance  # type: ignore[union-attr]

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The re-sampled tail: dropout (active in training mode) and the 1x1x1 head.
        (B, head_channels, D, H, W) -> (B, 1, D, H, W). With the growth head, ``features`` has one
        more channel (the growth offset ``s``) and the logit is ``logaddexp(core, risk + s)``."""
        return self._tail(features)[0]

    def _tail(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, core logits or None): one dropout mask for both growth heads."""
        if self.growth is None:
            return self.head(self.mc_dropout(features)), None
        dropped = self.mc_dropout(features[:, :-1])
        core = self.head(dropped)
        if self.config.growth_alone:  # the grown core alone
            return features[:, -1:], core
        shifted = features[:, -1:] if self.risk is None else self.risk(dropped) + features[:, -1:]
        return torch.logaddexp(core, shifted), core

    def sample_logits(
        self, features: torch.Tensor, n_samples: int, generator: torch.Generator | None = None,
        deterministic: bool = False, core_only: bool = False,
    ) -> torch.Tensor:
        """Monte-Carlo samples of the logits from precomputed ``features``, batched.

        Each sample draws its own channel-wise dropout mask (probability ``mc_dropout``, scaled
        by ``1 / (1 - p)`` as in training); because the head is 1x1x1, all samples are one
        matrix product ``(N, C) @ (C, D*H*W)``.

        Args:
            features: (B, C, D, H, W) from :meth:`features`.
            n_samples: N.
            generator: CPU random generator for the masks (seedable; device-independent).
            deterministic: dropout off; every sample equals the deterministic logits.
            core_only: a growth network's core head alone, from ``features`` without the growth
                channel (``decode(..., grow=False)``): the samples of the core the acute model reports.

        Returns:
            float32 logits (N, B, D, H, W). With ``growth_alone`` (and not ``core_only``) every sample is the
            growth channel (the grown core: no dropout acts on it).
        """
        if self.config.growth_alone and not core_only:
            grown = features[:, -1].float()
            return grown[None].expand(n_samples, *grown.shape)
        offset = None
        if self.growth is not None and not core_only:
            offset = features[:, -1].float().flatten(1)  # (B, V)
            features = features[:, :-1]
        batch, channels = features.shape[:2]
        p = self.config.mc_dropout
        flat = features.float().flatten(2)  # (B, C, V)
        heads = [self.head] if self.risk is None or core_only else [self.head, self.risk]
        if deterministic or p == 0.0:  # one evaluation, repeated: exactly zero spread
            masks = torch.ones(1, batch, channels)
        else:
            keep = torch.full((n_samples, batch, channels), 1.0 - p)
            masks = torch.bernoulli(keep, generator=generator) / (1.0 - p)
        masks = masks.to(features.device).transpose(0, 1)  # (B, N, C)
        # one batched matrix product per head: (B, N, C) @ (B, C, V) -> (N, B, V) (einsum took ~2x longer)
        logits = [(torch.matmul(masks * head.weight.reshape(1, 1, channels).float(), flat)
                   + head.bias.float()).transpose(0, 1) for head in heads]
        if offset is None:
            result = logits[0]
        else:
            result = torch.logaddexp(logits[0], offset if len(logits) == 1 else logits[1] + offset)
        if masks.shape[1] == 1:  # deterministic: one evaluation for every sample
            result = result.expand(n_samples, -1, -1)
        return result.reshape(n_samples, batch, *features.shape[2:])

    # -- the contract ------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        clinical_values: torch.Tensor,
        clinical_missing: torch.Tensor,
        flair_present: torch.Tensor,
        window: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict lesion logits and attention maps.

        Args:
            image: (B, 3, D, H, W) float32, channels DWI, ADC, FLAIR; D, H, W = K, J, I of the
                model grid, each divisible by :attr:`size_divisor`.
            clinical_values: (B, 10) float32 from :func:`StrokePredictorLib.clinical.encode`.
            clinical_missing: (B, 10) bool, True where a feature is missing.
            flair_present: (B,) bool.

        Returns:
            ``logits`` (B, 1, D, H, W); ``feature_attention`` (B, 10), rows sum to 1;
            ``spatial_attention`` (B, 1, D, H, W) in [0, 1]. Dropout is active in training mode only.
            With the growth head also ``core_logits`` (B, 1, D, H, W): the core head alone, and with
            clinical input ``growth_terms`` (B, 8): each feature's additive share of the growth offset.
            window: (B, 2, 3) int, optional, when ``image`` is a patch of the model grid (training):
                the patch's first voxel and the whole grid's size (k, j, i), multiples of
                :attr:`size_divisor`. Without it, the input is the whole grid.
        """
        out = self.features(image, clinical_values, clinical_missing, flair_present, window)
        logits, core = self._tail(out["features"])
        result = {
            "logits": logits,
            "feature_attention": out["feature_attention"],
            "spatial_attention": out["spatial_attention"],
        }
        if core is not None:  # growth head: the core alone, for training it on the acute lesion
            result["core_logits"] = core
        if "growth_terms" in out:  # and each clinical feature's additive share of the growth offset
            result["growth_terms"] = out["growth_terms"]
        return result


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_weights(model: StrokeNet, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model``, strictly except that FiLM and growth-head parameters absent
    from ``state`` start from their initialisation: weights of a network without FiLM load into one
    with FiLM, which then computes exactly the old network's output; into a growth network, whose
    risk head then starts as a copy of the old head (minus 2 logits), so that it computes the old
    output plus a small positive shift (0.13 logits plus the starting offset's share).

    Returns:
        The names of the parameters left at (or derived from) their initial value (FiLM, growth head).

    Raises:
        RuntimeError: any other missing, unexpected or differently shaped tensor.
    """
    result = model.load_state_dict(state, strict=False)
    new = ("film.", "growth.", "risk.")
    kept = [key for key in result.missing_keys if key.startswith(new)]
    others = [key for key in result.missing_keys if not key.startswith(new)]
    if model.risk is not None and "risk.weight" in kept:
        # the risk map starts as the old head's logits minus 2: logaddexp(core, core - 2) = core + 0.13,
        # so the growth network starts (almost exactly) at the old output, with a ranking to shift
        with torch.no_grad():
            model.risk.weight.copy_(model.head.weight)
            model.risk.bias.copy_(model.head.bias - 2.0)
    if others or result.unexpected_keys:
        details = []
        if others:
            details.append(f"missing {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}")
        if result.unexpected_keys:
            unexpected = result.unexpected_keys
            details.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise RuntimeError(f"Weights do not fit the network: {'; '.join(details)}.")
    return kept

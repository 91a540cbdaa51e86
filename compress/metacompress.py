"""MetaCompress: an image-conditioned generator of the compression matrix P (paper section 5, appendix 8.2, 9).

    E      = position embeddings of the layout                                   (n, d)
    Xk     = (X + E) Wk                                                          (n, dc)
    Xq     = Pool(X + E) Wq,  Pool: float stride n/m, kernel k, centred windows  (m, dc)
    P      = softmax_over_n( Xq diag(w) Xk^T / sqrt(dc) )                        (m, n)
    X~     = P X                                                                 (m, d)

At initialisation (Wq == Wk, w == 1, E == 0) P behaves like pooling of the input (appendix 9), but only when
q.k / sqrt(dc) is large, which depends on the feature norms and on how alike the image's tokens are.

``generator="normed"`` (docs/design.md §4.1, a variant of ours, not the paper's) makes that start hold on any model:

    Z      = unit_rms(X - mean_tokens(X)) + E        centred per image, each token scaled to norm sqrt(d);   (n, d)
                                                     E starts as unit-rms noise on the reference grid
    Xk     = Z Wk,  Xq = Pool(Z) Wq                                                                           (n|m, dc)
    P      = softmax_over_n( tau * cos(Xq diag(w), Xk) ),  tau = exp(log_temperature), learned               (m, n)

so the scores no longer scale with the features' norm or their shared component, and the initial sharpness is set
by ``temperature`` alone. ``generator="paper"`` (the default of the class) is eq. above, unchanged.

``locality > 0`` (docs/design.md §4.1, ours, with either generator) ties row i of P to where its window lies:

    c_j    = token j's centre in image units [0, 1]^2 (a newline takes the preceding token's)
    s_i^2  = squared spacing of the query centres in i's segment (1 / q_seg on a grid, 1 / q_seg^2 on one row)
    P      = softmax_over_n( scores - lambda * |c_centre(i) - c_j|^2 / s_i^2 ),  lambda = exp(log_locality), learned

A pre-LLM reducer keeps where an object lies only through which output slot holds it; with the paper's P a row can
gather tokens from anywhere, so the slot says little (the README's per-type losses at 90 %: left/right and height).

``spatial_prior > 0`` (docs/design.md §4.1, ours, with either generator) starts P as Spatial's rectangle averages
(``compress.baselines.spatial``) and learns a residual from there:

    R_i    = row i's rectangle of Spatial's pooling matrix S (m, n); queries Xq = S Z Wq (the rectangle's mean)
    P      = softmax_over_n( g * scores - beta * [j not in R_i] ),  g = score_gate (starts at 0),
                                                                     beta = exp(log_spatial_prior), learned

With g = 0 P is S up to exp(-beta) of mass outside the rectangles, so training starts at Spatial's loss, which the
paper's start does not reach on plain backgrounds (the README's KL per method on MT-Focus).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.layout import Layout, default_layout
from compress.reduction import Reduction

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "metacompress"
GENERATORS = ("paper", "normed")
COMPUTE_DTYPES = ("float32", "bfloat16")  # the train stage's train.compressor_dtype values


def pool_windows(n: int, m: int, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of a float-stride pooling from ``n`` to exactly ``m`` tokens.

    Window ``i`` is centred on token ``floor((i + 0.5) * n / m)`` and spans ``kernel_size`` tokens, clipped to the
    sequence. Returns ``index`` (m, k) long (clipped) and ``valid`` (m, k) bool.
    """
    centre = torch.floor((torch.arange(m, dtype=torch.float64) + 0.5) * n / m).long()
    offsets = torch.arange(kernel_size) - (kernel_size - 1) // 2
    raw = centre[:, None] + offsets[None, :]
    valid = (raw >= 0) & (raw < n)
    return raw.clamp(0, n - 1), valid


def pool_tokens(z: torch.Tensor, m: int, kernel_size: int, mode: str = "avg") -> torch.Tensor:
    """Down-sample ``z`` (n, d) to (m, d) by average (or max) pooling over :func:`pool_windows`."""
    index, valid = pool_windows(z.shape[0], m, kernel_size)
    index, valid = index.to(z.device), valid.to(z.device)
    windows = z[index]  # (m, k, d)
    if mode == "avg":
        weights = valid.to(z.dtype) / valid.sum(1, keepdim=True).to(z.dtype)
        return torch.einsum("mk,mkd->md", weights, windows)
    if mode == "max":
        return windows.masked_fill(~valid[..., None], float("-inf")).amax(1)
    raise ValueError(f"pooling must be 'avg' or 'max', got {mode!r}")


def token_coordinates(layout: Layout) -> torch.Tensor:
    """(n, 2) float64: each token's (row, column) centre in image units [0, 1]; a newline takes the coordinates of
    the token before it (the last of its row). Segments of one image (LLaVA-NeXT's base and crops) share the units."""
    coords = torch.zeros(layout.num_tokens, 2, dtype=torch.float64)
    for seg in layout.segments:
        rows = (torch.arange(seg.height, dtype=torch.float64) + 0.5) / seg.height
        cols = (torch.arange(seg.width, dtype=torch.float64) + 0.5) / seg.width
        coords[seg.indices()] = torch.cartesian_prod(rows, cols)
    for i in sorted(layout.newlines):
        coords[i] = coords[i - 1] if i > 0 else 0.0
    return coords


@functools.lru_cache(maxsize=256)
def _locality_geometry(layout: Layout, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Small per-(layout, m) tables: the query centres' coordinates (m, 2), 1 / s_i^2 (m,), the tokens' (n, 2)."""
    n = layout.num_tokens
    coords = token_coordinates(layout)
    centres = pool_windows(n, m, 1)[0][:, 0]  # (m,) each window's centre token
    segment_of = torch.full((n,), -1, dtype=torch.long)
    for k, seg in enumerate(layout.segments):
        segment_of[seg.indices()] = k
    for i in sorted(layout.newlines):
        segment_of[i] = segment_of[i - 1] if i > 0 else 0
    query_segment = segment_of[centres].clamp_min(0)
    inverse_spacing_sq = torch.empty(m, dtype=torch.float64)
    for k, seg in enumerate(layout.segments):
        mine = query_segment == k
        count = int(mine.sum())
        if count:
            flat = seg.height == 1 or seg.width == 1
            inverse_spacing_sq[mine] = float(count ** 2 if flat else count)
    return coords[centres], inverse_spacing_sq, coords


def locality_distances(layout: Layout, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(m, n) float32 on ``device``: |c_centre(i) - c_j|^2 / s_i^2 (module doc), the squared distance of token j from
    query i's window centre in units of the query spacing of i's segment; 0 on the centre token itself. Computed per
    call from small cached tables (an (m, n) table per layout would cost megabytes at LLaVA-NeXT's n)."""
    centre_coords, inverse_spacing_sq, coords = (t.to(device, torch.float32) for t in _locality_geometry(layout, m))
    return (centre_coords[:, None, :] - coords[None, :, :]).pow(2).sum(-1) * inverse_spacing_sq[:, None]


@functools.lru_cache(maxsize=256)
def _spatial_rows(layout: Layout, m: int) -> torch.Tensor:
    """(n,) long: the row of Spatial's pooling matrix whose rectangle holds token j; -1 for a token in none (a
    newline, a segment given no rows). The rectangles partition each pooled segment, so one index per token says all."""
    from compress.baselines.spatial import spatial_matrix

    s = spatial_matrix(layout, m)
    return torch.where(s.sum(0) > 0, s.argmax(0), -1)


def spatial_windows(layout: Layout, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(m, n) bool on ``device``: token j lies in row i's rectangle of Spatial's pooling matrix."""
    rows = _spatial_rows(layout, m).to(device)
    return rows[None, :] == torch.arange(m, device=device)[:, None]


def spatial_prior_tables(layout: Layout, m: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, n) Spatial's averaging matrix (the queries' pooling under a Spatial prior) and (m, n) 1.0 where token j lies
    outside row i's rectangle (the tokens the prior's ``-beta`` falls on), both in ``dtype``."""
    inside = spatial_windows(layout, m, device).to(dtype)
    return inside / inside.sum(1, keepdim=True), 1.0 - inside


class MetaCompress(nn.Module):
    """The MetaCompress generator.

    Call ``module(x, num_keep, layout=None)`` with ``x`` (n, d) to get a :class:`Reduction` whose ``tokens`` are
    (m, d) and ``matrix`` is P (m, n); or with a list of ``x_i`` (n_i, d) (and a list of ``num_keep`` / layouts)
    to get a list of reductions computed in one padded batch.
    """

    # On a 3-D rotary family its tokens sit at their pooling windows' centres (compress.lvlm.base.reduced_positions).
    positions_at_window_centres = True

    def __init__(self, hidden_size: int, compress_dim: int = 256, kernel_size: int = 3,
                 reference_grid: tuple[int, int] = (24, 24), pooling: str = "avg", generator: str = "paper",
                 temperature: float = 20.0, locality: float = 0.0, spatial_prior: float = 0.0) -> None:
        super().__init__()
        if hidden_size < 1 or compress_dim < 1 or kernel_size < 1:
            raise ValueError("hidden_size, compress_dim and kernel_size must be positive")
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not locality >= 0:
            raise ValueError(f"locality must be >= 0 (0: off), got {locality}")
        if not spatial_prior >= 0:
            raise ValueError(f"spatial_prior must be >= 0 (0: off), got {spatial_prior}")
        if spatial_prior > 0 and (locality > 0 or pooling != "avg"):
            raise ValueError("spatial_prior replaces the pooling windows (and the locality term) by Spatial's "
                             "rectangle averages: use it with locality 0 and pooling 'avg'")
        self.config = {"model_type": MODEL_TYPE, "hidden_size": hidden_size, "compress_dim": compress_dim,
                       "kernel_size": kernel_size, "reference_grid": list(reference_grid), "pooling": pooling,
                       "generator": generator}
        if generator == "normed":
            self.config["temperature"] = float(temperature)
            # shape (1,), not a 0-d tensor: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
            self.log_temperature = nn.Parameter(torch.full((1,), math.log(temperature)))
        if locality > 0:  # absent when off: the paper's module keeps its config and tensors exactly
            self.config["locality"] = float(locality)
            self.log_locality = nn.Parameter(torch.full((1,), math.log(locality)))
        if spatial_prior > 0:  # absent when off, as locality
            self.config["spatial_prior"] = float(spatial_prior)
            self.log_spatial_prior = nn.Parameter(torch.full((1,), math.log(spatial_prior)))
            self.score_gate = nn.Parameter(torch.zeros(1))
            # its tokens are rectangle averages: on a 3-D rotary family they take Spatial's positions, not the
            # 1-D windows' centres (compress.lvlm.base.reduced_positions)
            self.positions_at_window_centres = False
        self.kernel_size = kernel_size
        self.pooling = pooling
        self.generator = generator
        # Zero-initialised so that the initial behaviour is the pooling of appendix 9.
        self.position_table = nn.Parameter(torch.zeros(hidden_size, *reference_grid))
        self.layout_token = nn.Parameter(torch.zeros(hidden_size))
        w = torch.randn(hidden_size, compress_dim) / math.sqrt(compress_dim)
        self.w_query = nn.Parameter(w.clone())
        self.w_key = nn.Parameter(w.clone())
        self.omega = nn.Parameter(torch.ones(compress_dim))
        self._position_memo: dict = {}
        if generator == "normed":
            # Unit-rms positions, as large as the normalised features: identical tokens (a plain background) are
            # told apart by where they lie, so each row starts on its own pooling window (docs/design.md §4.1).
            with torch.no_grad():
                self.position_table.normal_()

    @staticmethod
    def init_kwargs(config: dict) -> dict:
        """The constructor's arguments recorded in a ``config`` (``module.config`` or a config.json)."""
        return {"hidden_size": config["hidden_size"], "compress_dim": config["compress_dim"],
                "kernel_size": config["kernel_size"], "reference_grid": tuple(config["reference_grid"]),
                "pooling": config.get("pooling", "avg"), "generator": config.get("generator", "paper"),
                "temperature": config.get("temperature", 20.0), "locality": config.get("locality", 0.0),
                "spatial_prior": config.get("spatial_prior", 0.0)}

    def locality_bias(self, layout: Layout, m: int) -> torch.Tensor | None:
        """(m, n) the locality term added to the scores (module doc), or None when ``locality`` is off."""
        if not hasattr(self, "log_locality"):
            return None
        distances = locality_distances(layout, m, self.log_locality.device).to(self.log_locality.dtype)
        return -self.log_locality.exp() * distances

    @property
    def compress_dim(self) -> int:
        return self.w_key.shape[1]

    def train(self, mode: bool = True) -> "MetaCompress":
        # An optimizer that writes through ``.data`` or a flat buffer (DeepSpeed's ZeRO steps) does not bump the
        # parameters' version counters, so the memo below is also dropped whenever the mode switches: a validation
        # pass (eval) between training steps never sees the table of an earlier step.
        self._position_memo = {}
        return super().train(mode)

    def position_embeddings(self, layout: Layout) -> torch.Tensor:
        """(n, d): the reference table interpolated to each segment's grid, the layout vector at newlines.
        Without gradients the result is memoised per layout until the parameters change in place (version
        counters) or the module's mode switches (``train``/``eval``); inference reuses it."""
        if torch.is_grad_enabled():
            return self._position_embeddings(layout)
        key = (layout, self.position_table._version, self.layout_token._version, self.position_table.device,
               self.position_table.dtype)
        if self._position_memo.get("key") != key:
            self._position_memo = {"key": key, "value": self._position_embeddings(layout)}
        return self._position_memo["value"]

    def _position_embeddings(self, layout: Layout) -> torch.Tensor:
        d = self.position_table.shape[0]
        emb = self.position_table.new_zeros(layout.num_tokens, d)
        for seg in layout.segments:
            grid = F.interpolate(self.position_table[None], size=(seg.height, seg.width), mode="bilinear",
                                 align_corners=False)[0]
            emb[seg.indices()] = grid.flatten(1).T
        if layout.newlines:
            emb[list(layout.newlines)] = self.layout_token
        return emb

    def logits(self, x: torch.Tensor, num_keep: int, layout: Layout | None = None) -> torch.Tensor:
        """Pre-softmax compression scores (m, n) for one sequence ``x`` (n, d)."""
        n = x.shape[0]
        if not 1 <= num_keep <= n:
            raise ValueError(f"num_keep must be in [1, {n}], got {num_keep}")
        layout = layout or default_layout(n)
        if layout.num_tokens != n:
            raise ValueError(f"layout describes {layout.num_tokens} tokens but x has {n}")
        z = x.to(self.w_key.dtype)
        if self.generator == "normed":
            z = z - z.mean(0, keepdim=True)
            z = z * (math.sqrt(z.shape[1]) / z.norm(dim=1, keepdim=True).clamp_min(1e-6))
        z = z + self.position_embeddings(layout)
        keys = z @ self.w_key
        prior = spatial_prior_tables(layout, num_keep, z.device, z.dtype) if hasattr(self, "score_gate") else None
        if prior is None:
            queries = pool_tokens(z, num_keep, self.kernel_size, self.pooling) @ self.w_query
        else:
            queries = prior[0] @ z @ self.w_query
        if self.generator == "normed":
            queries = F.normalize(queries * self.omega, dim=1, eps=1e-6)
            scores = self.log_temperature.exp() * queries @ F.normalize(keys, dim=1, eps=1e-6).T
        else:
            scores = (queries * self.omega) @ keys.T / math.sqrt(self.compress_dim)
        if prior is not None:
            return self.score_gate * scores - self.log_spatial_prior.exp() * prior[1]
        bias = self.locality_bias(layout, num_keep)
        return scores if bias is None else scores + bias

    def forward(self, x: torch.Tensor | list[torch.Tensor], num_keep: int | list[int],
                layout: Layout | list[Layout | None] | None = None) -> Reduction | list[Reduction]:
        if isinstance(x, torch.Tensor):
            return self._forward_batch([x], [num_keep], [layout])[0]
        count = len(x)
        keeps = num_keep if isinstance(num_keep, list) else [num_keep] * count
        layouts = layout if isinstance(layout, list) else [layout] * count
        if not len(keeps) == len(layouts) == count:
            raise ValueError("x, num_keep and layout must have the same number of entries")
        return self._forward_batch(list(x), keeps, layouts)

    def _forward_batch(self, xs: list[torch.Tensor], keeps: list[int], layouts: list[Layout | None]) -> list[Reduction]:
        # Pad to (B, m_max, n_max) so one softmax and one bmm serve the whole batch; padded keys get -inf.
        scores = [self.logits(x, m, lay) for x, m, lay in zip(xs, keeps, layouts)]
        n_max, m_max = max(x.shape[0] for x in xs), max(keeps)
        padded = scores[0].new_full((len(xs), m_max, n_max), float("-inf"))
        feats = xs[0].new_zeros(len(xs), n_max, xs[0].shape[1], dtype=scores[0].dtype)
        for b, (s, x) in enumerate(zip(scores, xs)):
            padded[b, : s.shape[0], : s.shape[1]] = s
            feats[b, : x.shape[0]] = x
        padded = padded.masked_fill(torch.isinf(padded).all(-1, keepdim=True), 0.0)  # padded query rows
        p = padded.softmax(-1)
        out = torch.bmm(p, feats)
        return [Reduction(tokens=out[b, :m].to(x.dtype), matrix=p[b, :m, : x.shape[0]])
                for b, (m, x) in enumerate(zip(keeps, xs))]

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "MetaCompress":
        """The saved compressor in the compute dtype its training recorded (``compute_dtype`` in config.json,
        float32 when absent): it then gives the P it gave in training (docs/design.md §6.3)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: a MetaCompress directory holds {CONFIG_NAME} "
                                        f"and {WEIGHTS_NAME}, as written by MetaCompress.save_pretrained")
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{directory / CONFIG_NAME}: model_type is {config.get('model_type')!r}, "
                             f"expected {MODEL_TYPE!r}")
        compute_dtype = config.get("compute_dtype", "float32")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{directory / CONFIG_NAME}: compute_dtype {compute_dtype!r} is not one of "
                             f"{list(COMPUTE_DTYPES)}; fix the key or remove it (float32)")
        module = cls(**cls.init_kwargs(config))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        expected = module.state_dict()
        if set(state) != set(expected):
            raise ValueError(f"{directory / WEIGHTS_NAME}: tensors {sorted(state)} do not match the expected "
                             f"{sorted(expected)}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{directory / WEIGHTS_NAME}: tensor {key!r} has shape {tuple(value.shape)}, "
                                 f"{CONFIG_NAME} implies {tuple(expected[key].shape)}")
        module.load_state_dict(state)
        if "compute_dtype" in config:  # kept, so that saving the module again keeps it
            module.config["compute_dtype"] = compute_dtype
        return module.to(map_location, getattr(torch, compute_dtype))

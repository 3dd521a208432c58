"""Backward warping of mask logits with per-mask flow maps (MPVSS section 3; spec §2.7).

The flow is estimated from the current frame to the key frame: every pixel ``p`` of the
current frame takes the key frame's mask logit at ``p + flow(p)`` (bilinear, border padding).
Warping acts on mask *logits*, before the sigmoid, as in the official code.

Two grid normalisations are supported:

* ``exact``: ``g = x / (W - 1) * 2 - 1`` with ``align_corners=True``; zero flow reproduces the
  input up to float32 rounding of the grid (max abs error below 1e-5 x the input's range,
  checked in ``test/nn/test_warp.py``).
* ``mmtrack``: ``g = x / W * 2 - 1`` with ``align_corners=True``, the normalisation of
  mmtrack's ``flow_warp_feats`` that the official MPVSS models were trained with. Zero flow
  then samples column ``x`` at ``x * (W - 1) / W`` (a shift of up to one pixel at the
  right/bottom edge), which official checkpoints expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["warp_mask_logits", "compose_flows", "mmtrack_to_exact", "WARP_NORMALIZATIONS"]

WARP_NORMALIZATIONS = ("exact", "mmtrack")


def _normalised_base_grid(h: int, w: int, scale_x: float, scale_y: float, dtype: torch.dtype,
                          device: torch.device) -> Tensor:
    """(1, 2, h, w): ``x * scale_x - 1`` and ``y * scale_y - 1``, the grid of zero flow."""
    xs = torch.arange(w, dtype=dtype, device=device) * scale_x - 1.0
    ys = torch.arange(h, dtype=dtype, device=device) * scale_y - 1.0
    return torch.stack((xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)))[None]


def warp_mask_logits(mask_logits: Tensor, flows: Tensor, normalization: str = "exact") -> Tensor:
    """Warp each mask with its own flow map (or all masks with one shared flow).

    Args:
        mask_logits: (B, N, h, w) float32 key-frame mask logits.
        flows: (B, N, 2, hf, wf) one flow per mask, or (B, 1, 2, hf, wf) one flow shared by all
            masks; float32; channel 0 = x (column) and 1 = y (row) displacement in pixels of the
            flow's own grid (hf, wf). The flow is upsampled bilinearly (align_corners=False) to
            (h, w) and scaled by w / wf (x) and h / hf (y); for ``mmtrack`` both components are
            scaled by w / wf, as the reference does.
        normalization: ``exact`` or ``mmtrack`` (see the module docstring).

    Returns:
        (B, N, h, w) float32 warped mask logits; all NaN when ``flows`` holds a NaN or infinite
        value (outside ``torch.jit`` tracing), so that callers' non-finite checks see it.

    Raises:
        ValueError: on mismatched batch/mask counts, a flow without 2 channels, or an unknown
            normalisation.
    """
    if normalization not in WARP_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {WARP_NORMALIZATIONS}, got {normalization!r}")
    if mask_logits.dim() != 4 or flows.dim() != 5 or flows.shape[2] != 2:
        raise ValueError(
            f"expected mask_logits (B,N,h,w) and flows (B,N|1,2,hf,wf); got {tuple(mask_logits.shape)} "
            f"and {tuple(flows.shape)}"
        )
    b, n, h, w = (int(v) for v in mask_logits.shape)
    fb, fn, _, hf, wf = (int(v) for v in flows.shape)
    if fb != b or fn not in (1, n):
        raise ValueError(f"flows {tuple(flows.shape)} do not match mask_logits {tuple(mask_logits.shape)}")

    # grid = (base + flow_up * pixel_scale) * norm - 1 per axis. Upsampling is linear, so the
    # per-axis factors are applied on the small flow grid and the zero-flow grid is added after;
    # grid_sample takes the permuted (B*fn, h, w, 2) view without a copy. Same result as
    # upsample-scale-add-normalise-stack up to float32 rounding, with 5 fewer full-size passes.
    if normalization == "mmtrack":
        pixel_scale = (w / wf, w / wf)
        norm = (2.0 / w, 2.0 / h)
    else:
        pixel_scale = (w / wf, h / hf)
        norm = (2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1))
    factor = torch.tensor([pixel_scale[0] * norm[0], pixel_scale[1] * norm[1]], dtype=flows.dtype,
                          device=flows.device).view(1, 2, 1, 1)
    flow = flows.reshape(b * fn, 2, hf, wf) * factor
    if (hf, wf) != (h, w):
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    grid = (flow + _normalised_base_grid(h, w, norm[0], norm[1], flow.dtype, flow.device)).permute(0, 2, 3, 1)
    if fn == 1:
        # One flow for every mask: the masks are the channels of one sample.
        src = mask_logits
    else:
        src = mask_logits.reshape(b * n, 1, h, w)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if not torch.jit.is_tracing():
        # grid_sample (and ONNX GridSample) clamps NaN/inf sampling positions to the border, so a
        # non-finite flow (an fp16 overflow in the motion module) would give finite, meaningless
        # mask logits that the caller's NaN check cannot see: carry it into the output instead
        # (one reduction over the small flow, no host sync; a sum of the flows, times 0, also made
        # finite flows of 3e37 NaN by overflowing).
        finite = torch.isfinite(flows).all()
        out.add_(torch.where(finite, 0.0, float("nan")).to(out.dtype))  # in place: no new tensor
    return out.reshape(b, n, h, w)


def mmtrack_to_exact(flows: Tensor, mask_hw: tuple[int, int], inverse: bool = False) -> Tensor:
    """The ``exact`` flow that samples where an ``mmtrack`` flow does (or, ``inverse``, back).

    An ``mmtrack`` flow ``f`` on the (hf, wf) grid, warping masks of (h, w) pixels, samples mask
    column ``(x + sx f_x) (w - 1) / w`` from column ``x`` (``sx = w / wf``; rows alike, with
    ``sx`` as the reference scales y by w / wf too): a displacement of ``sx f_x (w - 1) / w - x /
    w``, which the ``exact`` flow ``e_x = f_x (w - 1) / w - x / (w sx)`` gives. The ramps are
    linear, so they survive the bilinear upsampling to (h, w) (up to the half cell at the
    border, where the upsampling clamps: under 1/w of a flow-grid pixel).
    """
    h, w = int(mask_hw[0]), int(mask_hw[1])
    hf, wf = int(flows.shape[-2]), int(flows.shape[-1])
    sx, sy = w / wf, h / hf
    # mask-pixel coordinate of each flow-grid cell's centre (align_corners=False upsampling)
    x = (torch.arange(wf, dtype=flows.dtype, device=flows.device) + 0.5) * sx - 0.5
    y = (torch.arange(hf, dtype=flows.dtype, device=flows.device) + 0.5) * sy - 0.5
    ramp_x, ramp_y = (x / (w * sx)).view(1, wf), (y / (h * sy)).view(hf, 1)
    gain_x, gain_y = (w - 1) / w, (sx / sy) * (h - 1) / h
    fx, fy = flows[..., 0, :, :], flows[..., 1, :, :]
    if inverse:
        return torch.stack(((fx + ramp_x) / gain_x, (fy + ramp_y) / gain_y), dim=-3)
    return torch.stack((fx * gain_x - ramp_x, fy * gain_y - ramp_y), dim=-3)


def compose_flows(previous: Tensor, step: Tensor, normalization: str = "exact",
                  mask_hw: tuple[int, int] | None = None) -> Tensor:
    """Chain two backward flows: ``key <- previous frame <- current frame``.

    ``previous`` maps the previous frame to the key frame, ``step`` the current frame to the
    previous frame, both backward (a pixel ``p`` of the source frame sits at ``p + flow(p)`` in
    the target frame). The result maps the current frame to the key frame:
    ``flow(p) = step(p) + previous(p + step(p))``, with ``previous`` sampled bilinearly at the
    displaced point (``exact`` grid, border padding: see :func:`warp_mask_logits`). This is the
    composition of a chain of frame-to-frame flows that the ``chain_flow`` option of the
    propagators (:mod:`mpvss_ros.propagation`) builds one frame at a time.

    With ``mmtrack`` flows (official checkpoints' normalisation), whose warp samples a point
    shifted by up to a pixel at the right and bottom edge, both flows are first turned into the
    ``exact`` flows that sample the same points, composed, and turned back, so that warping once
    with the result samples where warping with each flow in turn would (composing them as exact
    flows added that shift once per link: up to k - 1 mask pixels after k links).

    Args:
        previous: (B, N, 2, h, w) float32, previous frame -> key frame, (x, y) in pixels of the
            (h, w) grid; N = 1 for one flow shared by every mask.
        step: (B, N or 1, 2, h, w) float32, current frame -> previous frame, same grid; a shared
            step (N = 1) moves every one of the ``previous`` flows.
        normalization: how the flows are warped (:data:`WARP_NORMALIZATIONS`).
        mask_hw: with ``mmtrack``, the (h, w) of the mask logits the flows warp.

    Returns:
        (B, max(N, N_step), 2, h, w) float32, current frame -> key frame, same units.

    Raises:
        ValueError: if the shapes are not (B, N, 2, h, w) or do not match, an unknown
            normalisation, or ``mmtrack`` without ``mask_hw``.
    """
    if previous.dim() != 5 or step.dim() != 5 or previous.shape[2] != 2 or step.shape[2] != 2:
        raise ValueError(f"expected flows (B,N,2,h,w); got {tuple(previous.shape)} and {tuple(step.shape)}")
    if normalization not in WARP_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {WARP_NORMALIZATIONS}, got {normalization!r}")
    if normalization == "mmtrack":
        if mask_hw is None:
            raise ValueError("composing mmtrack flows needs mask_hw, the size of the masks they warp")
        exact = compose_flows(mmtrack_to_exact(previous, mask_hw), mmtrack_to_exact(step, mask_hw))
        return mmtrack_to_exact(exact, mask_hw, inverse=True)
    b, n, _, h, w = (int(v) for v in previous.shape)
    sb, sn, _, sh, sw = (int(v) for v in step.shape)
    if (sb, sh, sw) != (b, h, w) or not (sn == n or 1 in (sn, n)):
        raise ValueError(f"step flow {tuple(step.shape)} does not match previous flow {tuple(previous.shape)}")
    m = max(n, sn)
    if n != m:
        previous = previous.expand(b, m, 2, h, w)
    # Each flow component is a "mask" warped by its own query's step flow: (B, 2M, h, w) with
    # the step repeated for x and y.
    src = previous.reshape(b, m * 2, h, w)
    moved = warp_mask_logits(src, step.expand(b, m, 2, h, w).repeat_interleave(2, dim=1), "exact")
    return step + moved.reshape(b, m, 2, h, w)

"""Poisson image editing in torch: batched, 2D and 3D, on any device.

Poisson image editing (Pérez, Gangnet and Blake, SIGGRAPH 2003) pastes a source
into a target by solving, inside a region, for the image ``u`` whose gradient
is closest to a *guidance field* ``v`` while ``u`` equals the target on the
region's boundary:

    Δu = div v   inside the region,      u = target   on its boundary.

With *mixed gradients* the guidance field keeps, per edge and per axis, the
source or the target gradient, whichever has the larger magnitude; outside the
mask it is the target's gradient.

How it is solved here
---------------------
Write ``u = target + w``. Then ``Δw = div(v - ∇target)`` with ``w = 0`` on the
boundary of a box around the mask. The discrete Dirichlet Laplacian on a box is
diagonalised by the type-I discrete sine transform (DST-I) along every axis,
so the solve is three steps: transform, divide by the eigenvalues, transform
back. The DST-I of the small boxes used here (tens of voxels per side) is done
as a dense matrix product with a cached sine matrix, which is faster than an
FFT at these sizes on CPUs and GPUs alike and is the same code path in 2D and
3D. Every sample of a batch is solved on its own box (the mask's bounding box
plus a one-voxel boundary ring, rounded up to a multiple of ``size_multiple``
so boxes of similar size share one batched solve), so the cost follows the
anomaly size, not the image size.

Discretisation
--------------
Gradients are forward differences living on the edges between neighbouring
voxels; the divergence is the matching backward difference, so ``div ∇`` is the
standard (2D: 5-point, 3D: 7-point) Laplacian. A voxel-wise mask ``m`` is turned
into an edge weight ``(m[i] + m[i+1]) / 2``, which also admits soft masks.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = [
    "blend_boxes",
    "box_flat_index",
    "guidance_divergence",
    "poisson_blend",
    "solve_dirichlet_poisson",
    "window_view",
]


@lru_cache(maxsize=256)
def _dst_basis(m: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DST-I matrix and Dirichlet-Laplacian eigenvalues for ``m`` unknowns.

    Returns ``(S, lam)`` with ``S[j, k] = sin(pi (j+1)(k+1) / (m+1))`` (symmetric,
    ``S @ S = (m+1)/2 I``) and ``lam[k] = 2 cos(pi (k+1) / (m+1)) - 2`` (< 0).
    Built in float64 and cast, so float32 callers get correctly rounded entries.
    """
    k = torch.arange(1, m + 1, dtype=torch.float64)
    basis = torch.sin(math.pi * torch.outer(k, k) / (m + 1))
    eigenvalues = 2.0 * torch.cos(math.pi * k / (m + 1)) - 2.0
    return basis.to(device=device, dtype=dtype), eigenvalues.to(device=device, dtype=dtype)


def _dst_along(x: torch.Tensor, axis: int, basis: torch.Tensor) -> torch.Tensor:
    """Apply the (unnormalised) DST-I along spatial ``axis`` (negative index) of ``x``."""
    if axis == -1:
        return x @ basis
    if axis == -2:
        return basis @ x
    # Axis -3 (3D): fold the two trailing axes into one so that a single
    # matrix product does the transform.
    shape = x.shape
    folded = x.reshape(*shape[:-3], shape[-3], shape[-2] * shape[-1])
    return (basis @ folded).reshape(shape)


def solve_dirichlet_poisson(rhs: torch.Tensor, spatial_dims: int | None = None) -> torch.Tensor:
    """Solve ``Δw = rhs`` on a box with ``w = 0`` just outside it.

    Parameters
    ----------
    rhs
        Right-hand side on the *interior* voxels, shape ``(..., m1, m2)`` or
        ``(..., m1, m2, m3)``; float32 or float64, any device. The grid spacing
        is 1 voxel; scale ``rhs`` by ``h**2`` for another spacing.
    spatial_dims
        2 or 3; defaults to ``rhs.ndim - 2`` (a ``(B, C, *spatial)`` tensor).

    Returns
    -------
    torch.Tensor
        ``w`` with the shape, dtype and device of ``rhs``.
    """
    dims = rhs.ndim - 2 if spatial_dims is None else spatial_dims
    if dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {dims}")
    if not rhs.is_floating_point():
        raise TypeError(f"rhs must be a floating-point tensor, got {rhs.dtype}")
    sizes = tuple(int(m) for m in rhs.shape[-dims:])
    device = str(rhs.device)
    spectrum = rhs
    for axis_from_end, m in zip(range(-dims, 0), sizes):
        spectrum = _dst_along(spectrum, axis_from_end, _dst_basis(m, rhs.dtype, device)[0])
    spectrum = spectrum.mul_(_spectral_factor(sizes, rhs.dtype, device))  # a fresh tensor
    for axis_from_end, m in zip(range(-dims, 0), sizes):
        spectrum = _dst_along(spectrum, axis_from_end, _dst_basis(m, rhs.dtype, device)[0])
    return spectrum


@lru_cache(maxsize=256)
def _spectral_factor(sizes: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """What the spectrum of the right-hand side is multiplied by: ``sizes``-shaped.

    One over the eigenvalues of the Dirichlet Laplacian (the sums of the
    per-axis ones), times the normalisation of the inverse transform: the
    inverse DST-I is the forward one times 2/(m+1) per axis, and folding that
    factor into the eigenvalue division saves one pass over the data.
    """
    dims = len(sizes)
    denominator = None
    normalisation = 1.0
    for axis, m in enumerate(sizes):
        view = [1] * dims
        view[axis] = m
        term = _dst_basis(m, dtype, device)[1].reshape(view)
        denominator = term if denominator is None else denominator + term
        normalisation *= 2.0 / (m + 1)
    return normalisation / denominator


def blend_boxes(
    target: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    mix_gradients: bool = True,
) -> torch.Tensor:
    """Poisson-blend sources into targets on whole boxes; return the change.

    Each box's outermost voxel ring is the Dirichlet boundary (values from the
    target); everything inside is solved for.

    Parameters
    ----------
    target, source
        ``(N, C, *box)`` with 2 or 3 spatial axes, floating point, same device.
    mask
        ``(N, 1, *box)`` or ``(N, C, *box)``, bool or float in [0, 1]: where the
        guidance field comes from the (mixed) source gradient.
    mix_gradients
        Per edge and axis, keep whichever of the source and target gradients
        has the larger magnitude (Pérez et al.'s mixed seamless cloning).

    Returns
    -------
    torch.Tensor
        ``blend - target``, shape ``(N, C, *box)``, exactly 0 on the ring.
    """
    dims = target.ndim - 2
    if dims not in (2, 3):
        raise ValueError(
            f"expected (N, C, *box) with 2 or 3 spatial axes, got {tuple(target.shape)}"
        )
    if source.shape != target.shape:
        raise ValueError(f"source shape {tuple(source.shape)} != target {tuple(target.shape)}")
    if min(target.shape[2:]) < 3:
        # No interior along some axis: nothing can change.
        return torch.zeros_like(target)
    rhs = guidance_divergence(target, source, mask.to(target.dtype), dims, mix_gradients)
    interior_change = solve_dirichlet_poisson(rhs, dims)
    pad = [1, 1] * dims
    return torch.nn.functional.pad(interior_change, pad)


def guidance_divergence(
    target: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    spatial_dims: int,
    mix_gradients: bool = True,
) -> torch.Tensor:
    """Right-hand side ``div(weight * (guide - grad target))`` on the boxes' interiors.

    Every value depends only on the voxels and edges next to it, so the
    right-hand side of a window of a box, computed on that window alone, is
    bit for bit the right-hand side of the box on the window's interior.

    Parameters
    ----------
    target
        ``(..., *box)``, floating point; every box side at least 3.
    source
        Same shape as ``target``.
    weight
        Voxel weights in [0, 1] (the mask as floats), broadcastable to
        ``source``.
    spatial_dims
        2 or 3, the number of trailing box axes.
    mix_gradients
        Keep, per edge, the source gradient only where its magnitude exceeds
        the target's.

    Returns
    -------
    torch.Tensor
        ``(..., *interior)``: the box shape less its one-voxel ring; a strided
        view into a buffer of the boxes' size.

    Notes
    -----
    All boxes are processed as one flat, contiguous vector: along an axis with
    stride ``step`` (1 for the last axis, the row length for the one before,
    ...) the neighbour of voxel ``v`` is ``v + step``, so every gradient and
    difference is one shifted subtraction over the whole vector. Pairs that
    straddle a row, plane or box end produce junk values, but only on the
    boxes' rings, which are dropped; every interior voxel is computed from its
    own neighbours with exactly the operations of the per-box formula. This
    matters on CPUs: small boxes have short rows, and per-row loops would cost
    more than the arithmetic.
    """
    box = tuple(source.shape[-spatial_dims:])
    flat_target = target.reshape(-1)
    flat_source = source.reshape(-1)
    # Edge weights are (w[v] + w[v + step]) / 2; halving the voxel weights
    # once gives the same floats (halving is exact above 1e-38) for one pass
    # instead of one per axis.
    half_weight = weight.expand(source.shape).reshape(-1) * 0.5
    total = flat_source.numel()
    steps = [math.prod(box[axis + 1 :]) for axis in range(spatial_dims)]
    # Voxels [steps[0], total - steps[0]) have both neighbours along every
    # axis inside the vector; the interiors of all boxes lie among them.
    first, last = steps[0], total - steps[0]
    rhs = flat_source.new_empty(total)
    # Scratch vectors shared by the axes: fewer and warmer allocations.
    scratch = [flat_source.new_empty(total) for _ in range(4)]
    for axis, step in enumerate(steps):
        edges = total - step  # edge e joins voxels e and e + step
        grad_target = torch.sub(flat_target[step:], flat_target[:-step], out=scratch[0][:edges])
        grad_source = torch.sub(flat_source[step:], flat_source[:-step], out=scratch[1][:edges])
        edge_weight = torch.add(half_weight[:-step], half_weight[step:], out=scratch[2][:edges])
        if mix_gradients:
            # guide - grad_target is grad_source - grad_target where the source
            # wins and 0 elsewhere, so the guide is never formed: the edge
            # weight is zeroed where the target wins. (That zero may come out
            # as -0 where the plain formula gives +0; sums and the solve treat
            # both alike.) The comparison writes 0/1 floats straight away:
            # on CPUs, making and consuming a bool tensor costs several times
            # as much as the arithmetic.
            source_wins = torch.abs(grad_source, out=scratch[3][:edges])
            torch.gt(source_wins, grad_target.abs(), out=source_wins)
            edge_weight = source_wins.mul_(edge_weight)
        excess = grad_source.sub_(grad_target).mul_(edge_weight)
        # Divergence at voxel v: excess[v] - excess[v - step].
        ahead, behind = excess[first:last], excess[first - step : last - step]
        if axis == 0:
            torch.sub(ahead, behind, out=rhs[first:last])
        else:
            rhs[first:last].add_(torch.sub(ahead, behind, out=scratch[0][: last - first]))
    inner = (slice(None),) * (source.ndim - spatial_dims) + (slice(1, -1),) * spatial_dims
    return rhs.view(source.shape)[inner]


def box_flat_index(
    spatial_shape: tuple[int, ...],
    starts: torch.Tensor,
    box_shape: tuple[int, ...],
    clamp: bool = False,
) -> torch.Tensor:
    """Flat indices of boxes inside a ``spatial_shape`` grid.

    Parameters
    ----------
    spatial_shape
        Shape of the grid, e.g. ``(Y, X)`` or ``(Z, Y, X)``.
    starts
        ``(N, D)`` integer tensor, the first voxel of each box (may lie
        outside the grid when ``clamp`` is True).
    box_shape
        Common box size, length ``D``.
    clamp
        Clamp each coordinate into the grid (edge replication); otherwise the
        boxes must lie inside the grid.

    Returns
    -------
    torch.Tensor
        ``(N, *box_shape)`` int64 indices into the flattened grid.
    """
    dims = len(spatial_shape)
    strides = [1] * dims
    for axis in range(dims - 2, -1, -1):
        strides[axis] = strides[axis + 1] * spatial_shape[axis + 1]
    flat = None
    for axis in range(dims):
        coords = starts[:, axis : axis + 1] + torch.arange(box_shape[axis], device=starts.device)
        if clamp:
            coords = coords.clamp(0, spatial_shape[axis] - 1)
        view = [starts.shape[0]] + [1] * dims
        view[1 + axis] = box_shape[axis]
        term = (coords * strides[axis]).reshape(view)
        flat = term if flat is None else flat + term
    return flat.expand(starts.shape[0], *box_shape)


def window_view(
    flat: torch.Tensor, grid_shape: tuple[int, ...], window_shape: tuple[int, ...]
) -> torch.Tensor:
    """Every window of ``window_shape`` in a stack of grids, as one view.

    Parameters
    ----------
    flat
        The 1-D view of a contiguous ``(..., *grid_shape)`` tensor.
    grid_shape
        Shape of one grid, e.g. ``(Y, X)`` or ``(Z, Y, X)``.
    window_shape
        Window size, one entry per grid axis, each at most the grid's.

    Returns
    -------
    torch.Tensor
        A ``(L, *window_shape)`` view of ``flat``'s memory: entry ``s`` is the
        window whose first voxel is ``flat[s]`` (meaningful when that window
        lies inside one grid). ``index_select(0, starts)`` cuts windows out
        with one index per window, instead of one per voxel as a flat-index
        gather needs. The windows overlap in memory, so write through the view
        only into windows that do not overlap one another (each element is
        then written once).
    """
    dims = len(grid_shape)
    strides = [1] * dims
    for axis in range(dims - 2, -1, -1):
        strides[axis] = strides[axis + 1] * grid_shape[axis + 1]
    last = sum((w - 1) * s for w, s in zip(window_shape, strides))
    return flat.as_strided((flat.numel() - last, *window_shape), (1, *strides))


def _global_index(
    volume: torch.Tensor, batch_index: torch.Tensor, flat_index: torch.Tensor
) -> torch.Tensor:
    """Indices into ``volume.reshape(-1)`` for every channel: ``(N, C, *box)``."""
    channels = volume.shape[1]
    voxels = volume[0, 0].numel()
    expand = (-1, 1, *([1] * (flat_index.ndim - 1)))
    offsets = batch_index.reshape(expand) * (channels * voxels) + (
        torch.arange(channels, device=volume.device) * voxels
    ).reshape(1, channels, *([1] * (flat_index.ndim - 1)))
    return flat_index.unsqueeze(1) + offsets


def _gather_boxes(
    volume: torch.Tensor, batch_index: torch.Tensor, flat_index: torch.Tensor
) -> torch.Tensor:
    """Cut boxes out of ``volume`` ``(B, C, *spatial)``; returns ``(N, C, *box)``."""
    index = _global_index(volume, batch_index, flat_index)
    return volume.reshape(-1)[index.reshape(-1)].reshape(index.shape)


def _scatter_add_boxes(
    volume: torch.Tensor, batch_index: torch.Tensor, flat_index: torch.Tensor, boxes: torch.Tensor
) -> None:
    """Add ``boxes`` ``(N, C, *box)`` into contiguous ``volume`` ``(B, C, *spatial)`` in place."""
    if not volume.is_contiguous():
        raise ValueError("volume must be contiguous to be updated in place")
    index = _global_index(volume, batch_index, flat_index)
    volume.view(-1).index_add_(0, index.reshape(-1), boxes.reshape(-1))


def solve_box_shape(
    low: torch.Tensor, high: torch.Tensor, spatial_shape: tuple[int, ...], size_multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve boxes around ``[low, high]`` voxel ranges (inclusive), per row.

    Each box holds the range plus a one-voxel boundary ring, is rounded up to a
    multiple of ``size_multiple`` (never beyond the grid) and is shifted to lie
    inside the grid. Returns ``(starts, sizes)`` as ``(N, D)`` int64 tensors.
    """
    grid = torch.tensor(spatial_shape, device=low.device)
    sizes = high - low + 3
    if size_multiple > 1:
        sizes = (sizes + size_multiple - 1) // size_multiple * size_multiple
    sizes = torch.minimum(sizes, grid)
    extra = sizes - (high - low + 1)
    starts = low - extra // 2
    starts = torch.maximum(torch.zeros_like(starts), torch.minimum(starts, grid - sizes))
    return starts, sizes


def poisson_blend(
    target: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    mix_gradients: bool = True,
    size_multiple: int = 8,
) -> torch.Tensor:
    """Poisson-blend ``source`` into ``target`` where ``mask`` is set.

    Parameters
    ----------
    target
        ``(B, C, *spatial)`` with 2 or 3 spatial axes, float32 or float64,
        any device. Never modified.
    source
        Same shape, dtype and device as ``target``: the source already placed
        in the target's frame.
    mask
        ``(B, 1, *spatial)``, bool or float in [0, 1].
    mix_gradients
        Use mixed gradients (keep the larger of source and target gradient per
        edge and axis); ``False`` gives plain seamless cloning.
    size_multiple
        Solve boxes are rounded up to a multiple of this many voxels so that
        boxes of similar size share one batched solve. ``1`` solves on the
        tightest box.

    Returns
    -------
    torch.Tensor
        The blended images, same shape, dtype and device as ``target``. A
        sample with an empty mask is returned unchanged, and only voxels inside
        a sample's solve box (its mask's bounding box plus a one-voxel ring,
        rounded up to ``size_multiple``) can differ from ``target``.

    Examples
    --------
    >>> import torch
    >>> target = torch.zeros(1, 1, 32, 32)
    >>> source = torch.rand(1, 1, 32, 32)
    >>> mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    >>> mask[..., 10:20, 12:18] = True
    >>> poisson_blend(target, source, mask).shape
    torch.Size([1, 1, 32, 32])
    """
    if target.ndim not in (4, 5):
        raise ValueError(
            f"target must be (B, C, Y, X) or (B, C, Z, Y, X), got shape {tuple(target.shape)}"
        )
    if not target.is_floating_point():
        raise TypeError(f"target must be floating point, got {target.dtype}")
    if source.shape != target.shape or source.dtype != target.dtype:
        raise ValueError(
            f"source must match target: got {tuple(source.shape)} {source.dtype}, "
            f"expected {tuple(target.shape)} {target.dtype}"
        )
    expected_mask = (target.shape[0], 1, *target.shape[2:])
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"mask must have shape {expected_mask}, got {tuple(mask.shape)}")
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")

    dims = target.ndim - 2
    spatial_shape = tuple(int(s) for s in target.shape[2:])
    result = target.clone()
    occupied = mask != 0
    present = occupied.flatten(1).any(dim=1)
    samples = torch.nonzero(present).flatten()
    if samples.numel() == 0:
        return result
    low = torch.empty(samples.numel(), dims, dtype=torch.long, device=target.device)
    high = torch.empty_like(low)
    for axis in range(dims):
        other = tuple(2 + a for a in range(dims) if a != axis)
        profile = occupied[samples, 0].any(dim=tuple(o - 1 for o in other))
        positions = torch.arange(spatial_shape[axis], device=target.device)
        low[:, axis] = torch.where(profile, positions, spatial_shape[axis]).amin(dim=1)
        high[:, axis] = torch.where(profile, positions, -1).amax(dim=1)
    starts, sizes = solve_box_shape(low, high, spatial_shape, size_multiple)

    sizes_cpu = sizes.cpu()
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, size in enumerate(sizes_cpu.tolist()):
        groups.setdefault(tuple(size), []).append(row)
    for box_shape, rows in groups.items():
        rows_t = torch.tensor(rows, device=target.device)
        batch_index = samples[rows_t]
        flat_index = box_flat_index(spatial_shape, starts[rows_t], box_shape)
        target_boxes = _gather_boxes(target, batch_index, flat_index)
        source_boxes = _gather_boxes(source, batch_index, flat_index)
        mask_boxes = _gather_boxes(mask.to(target.dtype), batch_index, flat_index)
        change = blend_boxes(target_boxes, source_boxes, mask_boxes, mix_gradients)
        _scatter_add_boxes(result, batch_index, flat_index, change)
    return result

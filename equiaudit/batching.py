"""Batch adapters: equiaudit's padded batch → what atomistic libraries take.

equiaudit hands a force field ``B·K`` rotated structures at once as a **padded batch**:

* ``pos`` ``(B, A, 3)`` float, Å; ``z`` ``(B, A)`` int atomic numbers;
* ``mask`` ``(B, A)`` bool, ``True`` for real atoms (``None``: every atom is real). Padded
  atoms may sit anywhere (usually at the origin) and must never interact;
* optionally ``cell`` ``(B, 3, 3)``, the lattice vectors as **rows** (ASE's convention), and
  ``pbc`` ``(B, 3)`` or ``(3,)`` bool (default: periodic along every axis whose lattice vector
  is non-zero). Without a cell the structures are molecules (no periodic images).

The helpers here turn it into

* :func:`to_ase_atoms`: a list of ``ase.Atoms`` (one per structure: the only per-structure
  Python loop here, because ``ase.Atoms`` is one object per structure);
* :func:`radius_graph`: ONE graph over the whole batch — edges, periodic shifts, the batch
  vector — built with tensor operations only (no loop over structures), optionally keeping
  only each atom's ``max_neighbors`` nearest (Orb's k-NN graphs);
* :func:`to_pyg_batch`: a PyTorch Geometric ``Batch`` (built directly from the flat tensors,
  so ``to_data_list()`` works as after ``Batch.from_data_list``);
* :func:`flatten` / :func:`unflatten`: real atoms in batch order ``(M, ...)`` and back to
  ``(B, A, ...)`` with zeros on padded atoms — per-atom outputs (forces) go back this way.

The families in :mod:`equiaudit.zoo` use these same functions (one implementation).

Edge convention (SevenNet's and Orb's): ``edge_index[0]`` is the source (sender) atom ``i``,
``edge_index[1]`` the target (receiver) atom ``j``, indices into the flat real atoms, and the
edge vector is ``pos[j] + shift − pos[i]`` with ``shift = unit_shifts @ cell[b]``
(:meth:`RadiusGraph.vectors`). Edges are ordered by structure, then source, then target image.

**Loading weights**: equiaudit loads a checkpoint with ``model.load_state_dict(state,
strict=True)`` (:func:`equiaudit.io.checkpoints.load_into_model`), so torch's
``register_load_state_dict_post_hook`` runs: a model that must rebuild buffers after its
weights change (a cached basis, a lookup table, a normaliser) registers the hook in its
``__init__`` and gets the rebuilt buffers in every audit (tested in ``tests/test_batching.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RadiusGraph", "radius_graph", "flatten", "unflatten", "to_ase_atoms", "to_pyg_batch", "default_pbc"]


def _valid(mask: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
    """``(B, A)`` bool; all True when ``mask`` is None."""
    if mask is None:
        return torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device)
    if mask.shape != pos.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, positions {tuple(pos.shape)}: expected mask (B, A)")
    return mask.to(device=pos.device, dtype=torch.bool)


def flatten(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real atoms of a padded ``(B, A, ...)`` tensor, in batch order: ``(M, ...)``, M = mask.sum()."""
    return values[_valid(mask, values)]


def unflatten(values: torch.Tensor, mask: torch.Tensor | None, batch_size: int | None = None,
              n_atoms: int | None = None) -> torch.Tensor:
    """``(M, ...)`` per-real-atom values back to ``(B, A, ...)``, zeros on padded atoms.

    Differentiable (a masked scatter), so autograd forces flow through it. With ``mask=None``
    give ``batch_size`` and ``n_atoms`` (every atom real)."""
    if mask is None:
        return values.reshape(batch_size, n_atoms, *values.shape[1:])
    valid = mask.to(device=values.device, dtype=torch.bool)
    out = values.new_zeros((*valid.shape, *values.shape[1:]))
    return out.index_put((valid,), values)


def default_pbc(cell: torch.Tensor | None, pbc: torch.Tensor | bool | None, batch_size: int) -> torch.Tensor | None:
    """``(B, 3)`` bool periodic axes: ``pbc`` broadcast, else the axes whose lattice vector is non-zero."""
    if cell is None:
        return None
    if pbc is None:
        return cell.detach().abs().sum(-1) > 0
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=cell.device)
    return pbc.expand(batch_size, 3) if pbc.dim() < 2 else pbc


@dataclass(frozen=True)
class RadiusGraph:
    """One graph over a padded batch; every index refers to the flat real atoms (batch order).

    Attributes:
        edge_index: ``(2, E)`` int64; row 0 the source atom ``i``, row 1 the target ``j``.
        unit_shifts: ``(E, 3)`` int64 lattice translations of the target's image (zeros without a cell).
        batch: ``(M,)`` int64 structure of each real atom.
        node: ``(B, A)`` int64 flat index of each padded slot (−1 on padded atoms).
        n_node: ``(B,)`` int64 real atoms per structure; ``n_edge``: ``(B,)`` edges per structure.
        edge_batch: ``(E,)`` int64 structure of each edge.
    """

    edge_index: torch.Tensor
    unit_shifts: torch.Tensor
    batch: torch.Tensor
    node: torch.Tensor
    n_node: torch.Tensor
    n_edge: torch.Tensor
    edge_batch: torch.Tensor

    def shifts(self, cell: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(E, 3)`` Cartesian shifts ``unit_shifts @ cell[b]`` (zeros without a cell)."""
        if cell is None:
            return torch.zeros(self.unit_shifts.shape, dtype=dtype or torch.get_default_dtype(),
                               device=self.unit_shifts.device)
        cell = cell.to(dtype) if dtype is not None else cell
        return torch.einsum("ea,eab->eb", self.unit_shifts.to(cell.dtype), cell[self.edge_batch])

    def vectors(self, flat_pos: torch.Tensor, cell: torch.Tensor | None = None) -> torch.Tensor:
        """``(E, 3)`` edge vectors ``pos[j] + shift − pos[i]`` from flat positions ``(M, 3)``
        (differentiable in ``flat_pos`` and ``cell``: autograd forces and stress)."""
        src, dst = self.edge_index
        vec = flat_pos[dst] - flat_pos[src]
        if cell is not None:
            vec = vec + self.shifts(cell, flat_pos.dtype)
        return vec


def _image_shifts(pos: torch.Tensor, valid: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                  cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The lattice translations any structure of the batch needs: ``(S, 3)`` int64 (the zero
    shift first) and ``(B, S)`` bool, which of them structure ``b`` uses.

    Along a periodic axis ``a`` structure ``b`` needs ``|n_a| ≤ ceil(cutoff/d_a + span_a)``
    (``d_a`` the distance between lattice planes, ``span_a`` the spread of its atoms'
    fractional coordinates: positions need not be wrapped into the cell)."""
    dtype = torch.float64
    cell64 = cell.detach().to(dtype)
    eye = torch.eye(3, dtype=dtype, device=cell.device)
    # Non-periodic axes get a unit stand-in so the inverse exists; they get no images anyway.
    safe = torch.where(pbc[:, :, None], cell64, eye)
    inverse = torch.linalg.inv(safe)                                   # frac = pos @ inverse
    frac = pos.detach().to(dtype) @ inverse                            # (B, A, 3)
    big = torch.finfo(dtype).max
    hi = torch.where(valid[..., None], frac, -big).amax(1)
    lo = torch.where(valid[..., None], frac, big).amin(1)
    span = torch.where(valid.any(1, keepdim=True), hi - lo, torch.zeros_like(hi))
    per_plane = inverse.norm(dim=1)                                    # 1/d_a = |column a of inverse|
    reach = torch.ceil(cutoff * per_plane + span).long()
    reach = torch.where(pbc, reach, torch.zeros_like(reach))           # (B, 3)
    n = reach.amax(0).tolist()                                         # one sync: the grid's size
    axes = [torch.arange(-k, k + 1, device=cell.device) for k in n]
    grid = torch.cartesian_prod(*axes).reshape(-1, 3)
    order = torch.argsort((grid != 0).any(1).long(), stable=True)      # the zero shift first
    grid = grid[order]
    used = (grid.abs()[None, :, :] <= reach[:, None, :]).all(-1)       # (B, S)
    return grid, used


def radius_graph(pos: torch.Tensor, mask: torch.Tensor | None, cutoff: float, *, cell: torch.Tensor | None = None,
                 pbc: torch.Tensor | bool | None = None, max_neighbors: int | None = None) -> RadiusGraph:
    """Every pair of real atoms of one structure closer than ``cutoff``, for the whole batch at once.

    Args:
        pos: ``(B, A, 3)`` positions (only read: the graph is built on detached values; take
            differentiable edge vectors with :meth:`RadiusGraph.vectors`).
        mask: ``(B, A)`` bool real atoms, or None.
        cutoff: strict: an edge needs distance ``< cutoff``.
        cell: ``(B, 3, 3)`` lattice vectors as rows, or None (molecules: no images).
        pbc: ``(B, 3)``/``(3,)``/bool periodic axes (default: axes with a non-zero lattice vector).
        max_neighbors: keep only each source atom's ``max_neighbors`` nearest targets
            (ties broken by index), as k-NN graphs (Orb) do; None keeps all.

    Returns:
        :class:`RadiusGraph`. An atom is never its own neighbour at zero shift; with a cell it may
        neighbour its own periodic images. Memory ``O(B·A²·S)`` for ``S`` lattice images: meant for
        the small and medium structures equiaudit audits, on CPU or GPU, with no Python loop.
    """
    if pos.dim() != 3 or pos.shape[-1] != 3:
        raise ValueError(f"positions must be (B, A, 3), got {tuple(pos.shape)}")
    valid = _valid(mask, pos)
    batch_size, n_atoms = valid.shape
    device = pos.device
    p = pos.detach()
    periodic = default_pbc(cell, pbc, batch_size)
    if periodic is not None and bool(periodic.any()):
        grid, used = _image_shifts(p, valid, cell, periodic, cutoff)
        translation = grid.to(p.dtype) @ cell.detach().to(p.dtype)                  # (B, S, 3)
    else:
        grid = torch.zeros((1, 3), dtype=torch.long, device=device)
        used = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
        translation = torch.zeros((batch_size, 1, 3), dtype=p.dtype, device=device)
    n_images = grid.shape[0]
    # (B, A_i, S, A_j): distance from atom i to image s of atom j. Differences, not cdist's
    # matmul form, so distances near the cutoff are exact to the float format.
    images = p[:, None, :, :] + translation[:, :, None, :]                          # (B, S, A, 3)
    distance = (images[:, None, :, :, :] - p[:, :, None, None, :]).norm(dim=-1)     # (B, A, S, A)
    self_pair = torch.zeros((n_atoms, n_images, n_atoms), dtype=torch.bool, device=device)
    self_pair[:, 0, :] = torch.eye(n_atoms, dtype=torch.bool, device=device)       # (A_i, S, A_j); shift 0 is first
    pairs = (valid[:, :, None, None] & valid[:, None, None, :] & used[:, None, :, None]
             & ~self_pair[None] & (distance < cutoff))
    if max_neighbors is not None:
        flat = torch.where(pairs, distance, torch.full_like(distance, float("inf"))).reshape(batch_size, n_atoms, -1)
        k = min(int(max_neighbors), flat.shape[-1])
        # Stable sort: among equal distances the lower (image, atom) index wins, deterministically.
        order = torch.sort(flat, dim=-1, stable=True).indices[..., :k]
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, True)
        pairs = pairs & keep.reshape(pairs.shape)
    b, i, s, j = pairs.nonzero(as_tuple=True)
    node = torch.where(valid, torch.cumsum(valid.reshape(-1), 0).reshape(batch_size, n_atoms) - 1,
                       torch.full_like(valid, -1, dtype=torch.long))
    n_node = valid.sum(1)
    return RadiusGraph(
        edge_index=torch.stack([node[b, i], node[b, j]]),
        unit_shifts=grid[s],
        batch=torch.arange(batch_size, device=device).repeat_interleave(n_node),
        node=node,
        n_node=n_node,
        n_edge=torch.bincount(b, minlength=batch_size),
        edge_batch=b,
    )


def to_ase_atoms(pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, cell: torch.Tensor | None = None,
                 pbc: torch.Tensor | bool | None = None) -> list:
    """One ``ase.Atoms`` per structure (real atoms only, float64 positions on the CPU).

    ``cell`` ``(B, 3, 3)`` rows are lattice vectors; ``pbc`` as in :func:`radius_graph`. Without
    a cell the atoms have a zero cell and ``pbc=False`` (molecules)."""
    import ase

    valid = _valid(mask, pos).cpu()
    positions = pos.detach().to("cpu", torch.float64).numpy()
    numbers = z.detach().to("cpu", torch.int64).numpy()
    keep = valid.numpy()
    periodic = default_pbc(cell, pbc, valid.shape[0])
    cells = None if cell is None else cell.detach().to("cpu", torch.float64).numpy()
    flags = None if periodic is None else periodic.cpu().numpy()
    return [
        ase.Atoms(numbers=numbers[b][keep[b]], positions=positions[b][keep[b]],
                  cell=None if cells is None else cells[b], pbc=False if flags is None else flags[b])
        for b in range(valid.shape[0])
    ]


def to_pyg_batch(pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, *, cutoff: float | None = None,
                 cell: torch.Tensor | None = None, pbc: torch.Tensor | bool | None = None,
                 max_neighbors: int | None = None):
    """A PyTorch Geometric ``Batch`` of the padded batch, built from flat tensors in one go.

    Fields: ``pos`` ``(M, 3)`` (the same tensor graph, so autograd through it reaches ``pos``),
    ``z`` ``(M,)``, ``batch``, ``ptr``; with ``cutoff``: ``edge_index`` ``(2, E)`` and
    ``unit_shifts`` ``(E, 3)`` from :func:`radius_graph` (and ``shifts`` ``(E, 3)`` Cartesian
    with a cell); with a cell: ``cell`` ``(B, 3, 3)`` and ``pbc`` ``(B, 3)``.
    ``batch.to_data_list()`` gives the per-structure ``Data`` objects, as after
    ``Batch.from_data_list``.
    """
    from torch_geometric.data import Batch, Data

    valid = _valid(mask, pos)
    batch_size = valid.shape[0]
    n_node = valid.sum(1)
    ptr = torch.cat([n_node.new_zeros(1), torch.cumsum(n_node, 0)])
    zeros = torch.zeros(batch_size, dtype=torch.long, device=pos.device)
    fields = {"pos": pos[valid], "z": z.to(pos.device)[valid].long()}
    slices = {"pos": ptr, "z": ptr}
    increments = {"pos": zeros, "z": zeros}
    if cutoff is not None:
        graph = radius_graph(pos, valid, cutoff, cell=cell, pbc=pbc, max_neighbors=max_neighbors)
        edge_ptr = torch.cat([n_node.new_zeros(1), torch.cumsum(graph.n_edge, 0)])
        fields.update(edge_index=graph.edge_index, unit_shifts=graph.unit_shifts)
        slices.update(edge_index=edge_ptr, unit_shifts=edge_ptr)
        # PyG stores edge_index per graph with local indices: the increment is each graph's offset.
        increments.update(edge_index=ptr[:-1], unit_shifts=zeros)
        if cell is not None:
            fields["shifts"] = graph.shifts(cell, pos.dtype)
            slices["shifts"], increments["shifts"] = edge_ptr, zeros
    if cell is not None:
        per_graph = torch.arange(batch_size + 1, device=pos.device)
        fields.update(cell=cell, pbc=default_pbc(cell, pbc, batch_size))
        slices.update(cell=per_graph, pbc=per_graph)
        increments.update(cell=zeros, pbc=zeros)
    batch_vector = torch.arange(batch_size, device=pos.device).repeat_interleave(n_node)
    out = Batch(_base_cls=Data, batch=batch_vector, ptr=ptr, **fields)
    out._num_graphs = batch_size
    out._slice_dict = {k: v.cpu() for k, v in slices.items()}
    out._inc_dict = {k: v.cpu() for k, v in increments.items()}
    return out

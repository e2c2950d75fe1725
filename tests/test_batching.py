"""equiaudit.batching: padded batch → ase.Atoms, one radius graph, a PyG Batch; and the
load_state_dict post hook honoured when equiaudit loads weights."""

from __future__ import annotations

import pytest
import torch

from equiaudit.batching import flatten, radius_graph, to_ase_atoms, to_pyg_batch, unflatten


def padded_batch(seed=0, batch=4, atoms=7, box=4.0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(batch, atoms, 3, generator=g, dtype=torch.float64) * box
    z = torch.randint(1, 30, (batch, atoms), generator=g)
    mask = torch.ones(batch, atoms, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 6] = False
    pos[~mask] = 0.0  # padded atoms at the origin: they must never become neighbours
    cell = torch.diag_embed(torch.tensor([4.0, 4.5, 5.0], dtype=torch.float64).expand(batch, 3)).clone()
    cell += 0.4 * torch.rand(batch, 3, 3, generator=g, dtype=torch.float64)  # triclinic
    return pos, z, mask, cell


def ase_edges(atoms, cutoff):
    """(i, j, shift) triples of ASE's own neighbour list: the reference."""
    from ase.neighborlist import neighbor_list

    i, j, shifts = neighbor_list("ijS", atoms, cutoff)
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, shifts.tolist())))


def our_edges(graph, b):
    chosen = graph.edge_batch == b
    offset = int(graph.n_node[:b].sum())
    src, dst = graph.edge_index[:, chosen] - offset
    return sorted(zip(src.tolist(), dst.tolist(), map(tuple, graph.unit_shifts[chosen].tolist())))


@pytest.mark.parametrize("periodic", [False, True])
def test_radius_graph_is_ases_neighbour_list_structure_by_structure(periodic):
    pytest.importorskip("ase")
    pos, z, mask, cell = padded_batch()
    cell = cell if periodic else None
    cutoff = 3.1
    graph = radius_graph(pos, mask, cutoff, cell=cell)
    for b, atoms in enumerate(to_ase_atoms(pos, z, mask, cell=cell)):
        assert our_edges(graph, b) == ase_edges(atoms, cutoff)
        assert int(graph.n_edge[b]) == len(ase_edges(atoms, cutoff))
    if periodic:  # images were needed: some edges cross the cell
        assert bool((graph.unit_shifts != 0).any())
    vectors = graph.vectors(flatten(pos, mask), cell)
    assert float(vectors.norm(dim=1).max()) < cutoff
    assert torch.equal(graph.batch, torch.arange(4).repeat_interleave(mask.sum(1)))


def test_radius_graph_unwrapped_positions_and_max_neighbors():
    pytest.importorskip("ase")
    pos, z, mask, cell = padded_batch(seed=1)
    # Each atom moved by its own whole lattice vector (unwrapped coordinates): the same periodic graph.
    lattice_steps = torch.randint(-2, 3, pos.shape, generator=torch.Generator().manual_seed(5)).double()
    moved = pos + torch.einsum("bai,bij->baj", lattice_steps, cell)
    moved[~mask] = 0.0
    a = radius_graph(pos, mask, 3.0, cell=cell)
    b = radius_graph(moved, mask, 3.0, cell=cell)
    assert torch.allclose(a.vectors(flatten(pos, mask), cell).norm(dim=1).sort().values,
                          b.vectors(flatten(moved, mask), cell).norm(dim=1).sort().values)
    # k nearest within the cutoff: each source keeps min(k, its neighbours), the closest ones.
    full = radius_graph(pos, mask, 6.0)
    knn = radius_graph(pos, mask, 6.0, max_neighbors=2)
    flat = flatten(pos, mask)
    full_counts = torch.bincount(full.edge_index[0], minlength=len(flat))
    knn_counts = torch.bincount(knn.edge_index[0], minlength=len(flat))
    assert torch.equal(knn_counts, full_counts.clamp(max=2))
    d_full, d_knn = full.vectors(flat).norm(dim=1), knn.vectors(flat).norm(dim=1)
    for atom in range(len(flat)):
        expected = d_full[full.edge_index[0] == atom].sort().values[:2]
        assert torch.allclose(d_knn[knn.edge_index[0] == atom].sort().values, expected)


def test_edge_vectors_are_differentiable_and_unflatten_restores_padding():
    pos, _, mask, _ = padded_batch(seed=2)
    pos = pos.clone().requires_grad_(True)
    graph = radius_graph(pos, mask, 3.0)
    energy = graph.vectors(flatten(pos, mask)).norm(dim=1).pow(2).sum()
    (grad,) = torch.autograd.grad(energy, pos)
    assert bool((grad[~mask] == 0).all()) and float(grad[mask].abs().sum()) > 0
    values = torch.arange(int(mask.sum()), dtype=torch.float64)[:, None].expand(-1, 3)
    padded = unflatten(values, mask)
    assert padded.shape == (*mask.shape, 3) and bool((padded[~mask] == 0).all())
    assert torch.equal(flatten(padded, mask), values)


def test_ase_atoms_per_structure():
    pytest.importorskip("ase")
    pos, z, mask, cell = padded_batch(seed=3)
    molecules = to_ase_atoms(pos, z, mask)
    assert [len(a) for a in molecules] == mask.sum(1).tolist()
    assert not molecules[0].pbc.any() and molecules[1].positions.tolist() == pos[1, :4].tolist()
    assert molecules[3].numbers.tolist() == z[3, :6].tolist()
    crystals = to_ase_atoms(pos, z, mask, cell=cell)
    assert crystals[2].pbc.all() and crystals[2].cell.array.tolist() == cell[2].tolist()


def test_pyg_batch_equals_from_data_list():
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Batch, Data

    pos, z, mask, cell = padded_batch(seed=4)
    batch = to_pyg_batch(pos, z, mask, cutoff=3.0, cell=cell)
    graph = radius_graph(pos, mask, 3.0, cell=cell)
    singles = []
    for b in range(len(pos)):
        chosen = graph.edge_batch == b
        offset = int(graph.n_node[:b].sum())
        singles.append(Data(pos=pos[b][mask[b]], z=z[b][mask[b]], edge_index=graph.edge_index[:, chosen] - offset,
                            unit_shifts=graph.unit_shifts[chosen], shifts=graph.shifts(cell)[chosen],
                            cell=cell[b:b + 1], pbc=torch.ones(1, 3, dtype=torch.bool)))
    reference = Batch.from_data_list(singles)
    assert batch.num_graphs == reference.num_graphs == len(pos)
    for key in ("pos", "z", "edge_index", "unit_shifts", "shifts", "cell", "pbc", "batch", "ptr"):
        assert torch.equal(batch[key], reference[key]), key
    for ours, theirs in zip(batch.to_data_list(), singles):
        for key in theirs.keys():
            assert torch.equal(ours[key], theirs[key]), key


class RebuildsAfterLoading(torch.nn.Module):
    """A model whose ``inverse`` buffer is derived from a weight and rebuilt by a
    ``load_state_dict`` post hook (as models with cached bases or lookup tables do)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), 2.0))
        self.register_buffer("inverse", 1.0 / self.weight.detach().clone(), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.rebuild())

    def rebuild(self):
        self.inverse = 1.0 / self.weight.detach().clone()

    def forward(self, pos):
        return pos * self.weight * self.inverse  # identity only when the buffer is current


def test_load_state_dict_post_hook_runs_when_equiaudit_loads_weights(tmp_path):
    from equiaudit.io.checkpoints import load_into_model, read_checkpoint

    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"weight": torch.tensor([4.0, 5.0, 8.0])}}, path)
    model = RebuildsAfterLoading()
    load_into_model(model, read_checkpoint(path))
    assert torch.equal(model.weight.detach(), torch.tensor([4.0, 5.0, 8.0]))
    assert torch.equal(model.inverse, torch.tensor([0.25, 0.2, 0.125]))  # rebuilt by the hook
    assert torch.equal(model(torch.ones(3)), torch.ones(3))

import time

import pytest
import torch

from equiaudit.lj import KA13, LJ13, LJ55, ClusterSpec, lj_energy_forces, sample_clusters


# Tiny tensors: intra-op threads only add overhead (10x on a busy 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


# The LJ13 global minimum (Wales & Doye 1997); the wall only adds energy.
LJ13_GROUND_STATE = -44.326801


@pytest.fixture(scope="module")
def demo_data():
    """The demo's default data sizes, generated once (and timed)."""
    start = time.perf_counter()
    lj = sample_clusters(2000, LJ13, torch.Generator().manual_seed(0))
    ka = sample_clusters(1000, KA13, torch.Generator().manual_seed(1))
    return lj, ka, time.perf_counter() - start


def _autograd_forces(pos, z, spec, mask=None):
    pos = pos.detach().clone().requires_grad_(True)
    energy, _ = lj_energy_forces(pos, z, spec, mask)
    (grad,) = torch.autograd.grad(energy.sum(), pos)
    return -grad


@pytest.mark.parametrize("spec", [LJ13, KA13], ids=["lj13", "ka13"])
def test_analytic_forces_match_autograd(spec):
    data = sample_clusters(16, spec, torch.Generator().manual_seed(3), n_burn=50, thin=10)
    pos, z = data["pos"].clone(), data["z"]
    # Push one atom of each cluster out past the wall so its force is exercised too.
    pos[:, 0] = pos[:, 0] * 3.0
    _, forces = lj_energy_forces(pos, z, spec)
    expected = _autograd_forces(pos, z, spec)
    scale = expected.abs().max()
    torch.testing.assert_close(forces, expected, rtol=1e-8, atol=1e-8 * scale)


def test_padded_atoms_are_ignored_and_forces_still_match():
    data = sample_clusters(4, KA13, torch.Generator().manual_seed(4), n_burn=50, thin=10)
    pad = 3
    pos = torch.cat([data["pos"], 100 * torch.randn(4, pad, 3, dtype=torch.float64)], 1)
    z = torch.cat([data["z"], torch.zeros(4, pad, dtype=torch.int64)], 1)
    mask = torch.cat([data["mask"], torch.zeros(4, pad, dtype=torch.bool)], 1)
    energy, forces = lj_energy_forces(pos, z, KA13, mask)
    torch.testing.assert_close(energy, data["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces[:, :-pad], data["forces"], rtol=1e-12, atol=1e-12)
    assert (forces[:, -pad:] == 0).all()
    torch.testing.assert_close(forces, _autograd_forces(pos, z, KA13, mask), rtol=1e-8, atol=1e-8)
    pos[:, -pad:] = float("nan")  # padding may hold anything
    assert torch.equal(lj_energy_forces(pos, z, KA13, mask)[0], energy)
    with pytest.raises(ValueError, match="not in species"):
        lj_energy_forces(data["pos"], torch.full_like(data["z"], 1), KA13)


def test_shapes_dtypes_and_consistency(demo_data):
    lj, ka, _ = demo_data
    for data, spec, n in ((lj, LJ13, 2000), (ka, KA13, 1000)):
        a = spec.n_atoms
        assert data["pos"].shape == (n, a, 3) and data["pos"].dtype == torch.float64
        assert data["forces"].shape == (n, a, 3) and data["forces"].dtype == torch.float64
        assert data["energy"].shape == (n,) and data["energy"].dtype == torch.float64
        assert data["z"].shape == (n, a) and data["z"].dtype == torch.int64
        assert data["mask"].shape == (n, a) and data["mask"].all()
        assert all(torch.isfinite(data[k]).all() for k in ("pos", "energy", "forces"))
        # Returned energies/forces are exactly those of the returned positions.
        energy, forces = lj_energy_forces(data["pos"][:64], data["z"][:64], spec)
        torch.testing.assert_close(energy, data["energy"][:64])
        torch.testing.assert_close(forces, data["forces"][:64])
        # Centred clusters; no net force (the wall acts about the centroid).
        assert data["pos"].mean(1).abs().max() < 1e-12
        assert data["forces"].sum(1).abs().max() < 1e-9


def test_clusters_are_bound_physical_and_fit_the_voxel_box(demo_data):
    lj, ka, _ = demo_data
    for data, spec in ((lj, LJ13), (ka, KA13)):
        radius = data["pos"].norm(dim=-1)  # centred: distance to the centroid
        assert radius.max() < (spec.wall_radius + 1.0) * spec.sigma_angstrom
        assert radius.max() < 4.0  # inside an 8 Å box (32³ voxels of 0.25 Å)
        pair = torch.cdist(data["pos"], data["pos"]) + 1e3 * torch.eye(spec.n_atoms, dtype=torch.float64)
        nearest = pair.min(-1).values
        assert nearest.min() > 0.6 * spec.sigma_angstrom  # no overlapping atoms
        assert 1.0 < nearest.median() < 1.5  # Å: a molecule-like length scale
    energy = lj["energy"]
    assert energy.min() >= LJ13_GROUND_STATE - 1e-6
    assert -43.0 < energy.mean() < -36.0  # a warm solid cluster at T = 0.2
    assert energy.std() > 0.3  # samples differ


def test_binary_mixture_has_both_species(demo_data):
    _, ka, _ = demo_data
    assert set(ka["z"].unique().tolist()) == {6, 8}
    assert ((ka["z"] == 6).sum(1) == 10).all() and ((ka["z"] == 8).sum(1) == 3).all()
    # Species are shuffled over sites, not always the same atom index.
    assert (ka["z"] == 8).float().mean(0).min() > 0.05


def test_samples_are_decorrelated(demo_data):
    lj, _, _ = demo_data
    # Consecutive samples of a chain (default: 4 per chain) are only weakly correlated.
    e = lj["energy"].reshape(-1, 4)
    e = e - e.mean()
    lag1 = (e[:, 1:] * e[:, :-1]).mean() / e.square().mean()
    assert lag1 < 0.6


def test_deterministic_for_a_seed():
    a = sample_clusters(24, KA13, torch.Generator().manual_seed(7), n_burn=40, thin=10)
    b = sample_clusters(24, KA13, torch.Generator().manual_seed(7), n_burn=40, thin=10)
    c = sample_clusters(24, KA13, torch.Generator().manual_seed(8), n_burn=40, thin=10)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["pos"], c["pos"])


def test_lj55_and_custom_spec():
    data = sample_clusters(6, LJ55, torch.Generator().manual_seed(0), n_burn=100, thin=20)
    assert data["pos"].shape == (6, 55, 3)
    assert data["pos"].norm(dim=-1).max() < (LJ55.wall_radius + 1.0) * LJ55.sigma_angstrom
    spec = ClusterSpec(n_atoms=7, temperature=0.1, sigma_angstrom=1.0)
    small = sample_clusters(5, spec, torch.Generator().manual_seed(0), n_burn=50, thin=10, dtype=torch.float32)
    assert small["pos"].shape == (5, 7, 3) and small["pos"].dtype == torch.float32
    with pytest.raises(ValueError):
        ClusterSpec(species=(6, 8))  # several species need a 2x2 table


def test_generation_time_is_reasonable(demo_data):
    _, _, seconds = demo_data
    # Typically ~3 s on 2 cores; generous bound so a busy machine does not fail it.
    assert seconds < 60

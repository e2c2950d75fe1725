import pytest
import torch

from equiaudit.engine import HeadSpec, OrbitSpec
from equiaudit.groups import make_rotation_set
from equiaudit.metrics import elementwise_loss, orbit_terms, reduce_per_sample, summarize
from helpers import LinearMap, RadialScaling, linear_map_ree, random_matrix, run_audit, vector_dataset, vector_spec


def _audit(model, data, k, seed=0, spec=None, group="so3"):
    return run_audit(model.double(), data, spec or vector_spec(), group=group, k=k, seed=seed, batch_size=128, bootstrap=200)


@pytest.mark.parametrize("k", [8, 32])
@pytest.mark.parametrize("rep", ["vector", "point"])
def test_linear_map_known_answer(k, rep):
    matrix = random_matrix()
    truth = linear_map_ree(matrix)
    assert 0.1 < truth < 0.9
    summary = _audit(LinearMap(matrix), vector_dataset(1024, 8), k, spec=vector_spec(rep))["total"]
    assert summary.rel_equiv_error == pytest.approx(truth, rel=0.02)
    assert summary.rel_equiv_error_ci_low < summary.rel_equiv_error < summary.rel_equiv_error_ci_high


def test_plug_in_is_biased_low_and_the_correction_is_not():
    k = 8
    matrix = random_matrix()
    truth = linear_map_ree(matrix)
    data = vector_dataset(1024, 8)
    rotations = make_rotation_set("so3", k).sample(1024, 0)
    model = LinearMap(matrix).double()
    pred = torch.einsum("bkji,bknj->bkni", rotations, model(torch.einsum("bkij,bnj->bkni", rotations, data["pos"])))
    corrected = orbit_terms(pred, data["target"], "mse")
    plug_in = orbit_terms(pred, data["target"], "mse", exact=True)  # exact=True skips the correction
    ree = lambda t: (t.equiv_error.mean() / t.loss_aug.mean()).item()
    assert ree(plug_in) == pytest.approx(truth * (k - 1) / k, rel=0.02)
    assert abs(ree(plug_in) / truth - 1) > 0.08
    assert ree(corrected) == pytest.approx(truth, rel=0.02)


def test_jackknife_equals_exact_correction_for_mse():
    pred = torch.randn(5, 7, 4, 3, dtype=torch.float64)
    target = torch.randn(5, 4, 3, dtype=torch.float64)
    mse = orbit_terms(pred, target, "mse")
    # Run the generic jackknife path on the same squared error through the huber loss with a huge delta.
    jack = orbit_terms(pred, target, "huber", huber_delta=1e9)
    assert torch.allclose(jack.equiv_error * 2, mse.equiv_error, atol=1e-10)
    assert torch.allclose(jack.loss_aug * 2, mse.loss_aug, atol=1e-10)


@pytest.mark.parametrize("loss", ["l1", "huber", "mse"])
def test_equivariant_model_reads_at_float_floor(loss):
    summary = _audit(RadialScaling(), vector_dataset(256, 8), 16, spec=vector_spec(loss=loss))["total"]
    assert summary.loss_aug > 1e-3
    assert abs(summary.rel_equiv_error) < 1e-5


def test_non_equivariant_model_is_caught_with_other_losses():
    for loss in ("l1", "huber"):
        summary = _audit(LinearMap(random_matrix()), vector_dataset(256, 8), 16, spec=vector_spec(loss=loss))["total"]
        assert summary.rel_equiv_error > 0.05


def test_jackknife_removes_bias_for_l1():
    """L1 at K=4 with the jackknife agrees with a K=64 estimate; the plug-in does not."""
    matrix = random_matrix()
    data = vector_dataset(2048, 4)
    small = _audit(LinearMap(matrix), data, 4, spec=vector_spec(loss="l1"))["total"].rel_equiv_error
    large = _audit(LinearMap(matrix), data, 64, spec=vector_spec(loss="l1"), seed=1)["total"].rel_equiv_error
    assert small == pytest.approx(large, rel=0.05)


def test_cross_entropy_invariant_logits():
    class Classifier(torch.nn.Module):
        def __init__(self, invariant):
            super().__init__()
            self.invariant = invariant
            self.w = torch.nn.Linear(3, 4).double()

        def forward(self, pos):
            feats = pos.norm(dim=-1, keepdim=True).mean(1).expand(-1, 3) if self.invariant else pos.mean(1)
            return self.w(feats)

    data = vector_dataset(128, 5)
    data["label"] = torch.randint(4, (128,), generator=torch.Generator().manual_seed(0))
    spec = OrbitSpec(fields={"pos": "point"}, heads=(HeadSpec("cls", "scalar", "label", loss="cross_entropy"),),
                     inputs=["pos"], outputs=["cls"], mask=None)
    data["pos"] = data["pos"] + torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # centroid matters
    assert abs(_audit(Classifier(True), data, 8, spec=spec)["total"].rel_equiv_error) < 1e-6
    data["pos"] = data["pos"] * 3
    spec_vec = OrbitSpec(fields={"pos": "vector"}, heads=spec.heads, inputs=["pos"], outputs=["cls"], mask=None)
    assert _audit(Classifier(False), data, 8, spec=spec_vec)["total"].rel_equiv_error > 1e-3


def test_invariant_energy_head_and_weighted_total():
    class EnergyForces(torch.nn.Module):
        def __init__(self, matrix):
            super().__init__()
            self.linear = LinearMap(matrix)

        def forward(self, pos):
            return pos.square().sum((1, 2)), self.linear(pos)

    data = vector_dataset(256, 6)
    data["energy"] = data["pos"].square().sum((1, 2)) * 1.1
    heads = (HeadSpec("energy", "scalar", "energy", weight=0.5), HeadSpec("forces", "vector", "target", weight=2.0))
    spec = OrbitSpec(fields={"pos": "vector"}, heads=heads, inputs=["pos"], outputs=["energy", "forces"], mask=None)
    results = _audit(EnergyForces(random_matrix()), data, 8, spec=spec)
    assert abs(results["energy"].rel_equiv_error) < 1e-10  # rotation-invariant energy
    assert results["energy"].loss_aug > 0
    assert results["forces"].rel_equiv_error > 0.05
    for key in ("loss_aug", "equiv_error", "loss_sym"):
        total = 0.5 * getattr(results["energy"], key) + 2.0 * getattr(results["forces"], key)
        assert getattr(results["total"], key) == pytest.approx(total, rel=1e-12)
    for summary in (results.total, *results.heads.values()):
        assert summary.loss_aug == pytest.approx(summary.loss_sym + summary.equiv_error, rel=1e-12)


def test_exact_finite_group_needs_no_correction():
    matrix = random_matrix()
    summary = _audit(LinearMap(matrix), vector_dataset(1024, 8), None, group="octahedral")["total"]
    # The cube group is a 2-design on vectors: averaging R^T A R over it gives tr(A)/3 I exactly.
    assert summary.rel_equiv_error == pytest.approx(linear_map_ree(matrix), rel=0.02)


def test_reduce_per_sample_with_mask():
    terms = torch.ones(2, 4, 3, dtype=torch.float64)
    terms[0, 3] = 100.0  # padded atom
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(reduce_per_sample(terms, mask), torch.ones(2, dtype=torch.float64))


def test_summarize_ci_and_identity():
    g = torch.Generator().manual_seed(0)
    aug = torch.rand(500, generator=g, dtype=torch.float64) + 1
    err = 0.1 * aug * torch.rand(500, generator=g, dtype=torch.float64)
    s = summarize(aug, err, generator=torch.Generator().manual_seed(1))
    assert s.ci_low < s.rel_equiv_error < s.ci_high
    assert s.loss_aug == pytest.approx(s.loss_sym + s.equiv_error)
    assert s.rel_equiv_error == pytest.approx((err.sum() / aug.sum()).item())


def test_accumulator_needs_k_at_least_two():
    with pytest.raises(ValueError, match="at least 2"):
        orbit_terms(torch.zeros(2, 1, 3), torch.zeros(2, 3))


def test_elementwise_cross_entropy_matches_torch():
    logits = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.randint(5, (6,))
    ours = elementwise_loss("cross_entropy", logits, labels)
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))

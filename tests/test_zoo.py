import pytest
import torch

from equiaudit import zoo
from equiaudit.rotations import haar_rotations


# Tiny tensors: intra-op threads only add overhead (10x on a busy 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


B, A, PAD = 4, 9, 3  # the last PAD atoms of every sample are padding

FORCE_FIELDS = {
    "transformer": lambda **kw: zoo.transformer_force_field(hidden=32, **kw),
    "egnn": lambda **kw: zoo.egnn_force_field(hidden=32, **kw),
}
VELOCITIES = {
    "transformer": lambda: zoo.transformer_velocity(hidden=32),
    "egnn": lambda: zoo.egnn_velocity(hidden=32),
}


def _batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, A, 3, generator=g, dtype=torch.float64).to(dtype)
    z = torch.tensor([1, 6, 7, 8])[torch.randint(4, (B, A), generator=g)]
    mask = torch.ones(B, A, dtype=torch.bool)
    mask[:, -PAD:] = False
    t = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    return pos, z, mask, t


def _rotations(dtype, seed=1):
    return haar_rotations(B, torch.Generator().manual_seed(seed)).to(dtype)  # (B, 3, 3)


def _rotate(v, rot):
    return v @ rot.transpose(-1, -2)


def _call(model, kind, pos, z, mask, t):
    return model(pos, z, mask) if kind == "ff" else model(pos, t, z, mask)


def _all_models():
    for name, build in FORCE_FIELDS.items():
        yield f"ff-{name}", "ff", build
        yield f"ff-{name}-grad", "ff", lambda build=build: build(grad=True)
    for name, build in VELOCITIES.items():
        yield f"velocity-{name}", "velocity", build


MODELS = list(_all_models())
IDS = [m[0] for m in MODELS]


def _build(build, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build().to(dtype)


@pytest.mark.parametrize("name,kind,build", MODELS, ids=IDS)
def test_point_model_shapes(name, kind, build):
    pos, z, mask, t = _batch()
    out = _call(_build(build), kind, pos, z, mask, t)
    if kind == "ff":
        assert out["energy"].shape == (B,) and out["forces"].shape == (B, A, 3)
        vec = out["forces"]
    else:
        assert set(out) == {"velocity"} and out["velocity"].shape == (B, A, 3)
        vec = out["velocity"]
    assert torch.isfinite(vec).all()
    assert (vec[:, -PAD:] == 0).all()  # padded atoms output 0
    # mask=None means every atom is real.
    assert _call(_build(build), kind, pos, z, None, t)[next(iter(out))].shape[0] == B


@pytest.mark.parametrize("name,kind,build", MODELS, ids=IDS)
def test_padded_atoms_do_not_influence_real_ones(name, kind, build):
    model = _build(build).eval()
    pos, z, mask, t = _batch()
    out = _call(model, kind, pos, z, mask, t)
    pos2, z2 = pos.clone(), z.clone()
    pos2[:, -PAD:] = 50 * torch.randn(B, PAD, 3)
    z2[:, -PAD:] = 0
    out2 = _call(model, kind, pos2, z2, mask, t)
    for key in out:
        torch.testing.assert_close(out[key], out2[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("grad", [False, True])
def test_egnn_force_field_is_exactly_equivariant(dtype, tol, grad):
    model = _build(lambda: FORCE_FIELDS["egnn"](grad=grad), dtype=dtype).eval()
    pos, z, mask, _ = _batch(dtype)
    rot = _rotations(dtype)
    out = model(pos, z, mask)
    out_rot = model(_rotate(pos, rot), z, mask)
    torch.testing.assert_close(out_rot["energy"], out["energy"], rtol=tol, atol=tol)
    torch.testing.assert_close(out_rot["forces"], _rotate(out["forces"], rot), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_egnn_velocity_is_exactly_equivariant_and_translation_invariant(dtype, tol):
    model = _build(VELOCITIES["egnn"], dtype=dtype).eval()
    pos, z, mask, t = _batch(dtype)
    rot = _rotations(dtype)
    v = model(pos, t, z, mask)["velocity"]
    v_rot = model(_rotate(pos, rot), t, z, mask)["velocity"]
    torch.testing.assert_close(v_rot, _rotate(v, rot), rtol=tol, atol=tol)
    shift = torch.randn(B, 1, 3, dtype=dtype)
    v_shift = model(pos + shift, t, z, mask)["velocity"]
    torch.testing.assert_close(v_shift, v, rtol=tol, atol=tol)
    assert v.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("kind", ["ff", "velocity"])
def test_transformer_is_not_equivariant(kind):
    # Negative control: the plain transformer must show a clear rotation error.
    build = FORCE_FIELDS["transformer"] if kind == "ff" else VELOCITIES["transformer"]
    model = _build(build).eval()
    pos, z, mask, t = _batch()
    rot = _rotations(torch.float32)
    out = _call(model, kind, pos, z, mask, t)
    out_rot = _call(model, kind, _rotate(pos, rot), z, mask, t)
    key = "forces" if kind == "ff" else "velocity"
    assert (out_rot[key] - _rotate(out[key], rot)).abs().max() > 1e-3
    if kind == "ff":
        assert (out_rot["energy"] - out["energy"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(FORCE_FIELDS))
def test_grad_forces_are_minus_energy_gradient(name):
    model = _build(lambda: FORCE_FIELDS[name](grad=True), dtype=torch.float64).eval()
    pos, z, mask, _ = _batch(torch.float64)
    with torch.no_grad():  # the model turns grad on itself
        out = model(pos, z, mask)
    leaf = pos.clone().requires_grad_(True)
    energy = model(leaf, z, mask)["energy"]
    (grad,) = torch.autograd.grad(energy.sum(), leaf)
    torch.testing.assert_close(out["forces"], -grad * mask.unsqueeze(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["energy"], energy.detach())
    assert not out["forces"].requires_grad  # eval mode: no graph kept


def test_cnn_denoiser_shapes_and_not_equivariant():
    torch.manual_seed(0)
    model = zoo.cnn_denoiser(channels=2, width=8, depth=2).eval()
    for size in (16, 15):
        grid = torch.randn(2, 2, size, size, size)
        assert model(grid).shape == grid.shape
    grid = torch.randn(2, 2, 16, 16, 16)
    # A 90° cube rotation (exact on the grid) does not commute with the random CNN.
    rotated = torch.rot90(grid, 1, dims=(2, 3))
    diff = model(rotated) - torch.rot90(model(grid), 1, dims=(2, 3))
    assert diff.abs().max() > 1e-3


def _train(model, loss_fn, steps=25, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,kind,build", MODELS, ids=IDS)
def test_point_models_train(name, kind, build):
    model = _build(build)
    pos, z, mask, t = _batch(seed=2)
    g = torch.Generator().manual_seed(3)
    target_vec = torch.randn(B, A, 3, generator=g) * mask.unsqueeze(-1)
    target_energy = torch.randn(B, generator=g)

    def loss_fn():
        out = _call(model, kind, pos, z, mask, t)
        if kind == "ff":
            return (out["energy"] - target_energy).square().mean() + (out["forces"] - target_vec).square().mean()
        return (out["velocity"] - target_vec).square().mean()

    losses = _train(model, loss_fn)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("name,kind,build", MODELS, ids=IDS)
def test_every_parameter_gets_a_gradient(name, kind, build):
    model = _build(build).train()
    pos, z, mask, t = _batch()
    out = _call(model, kind, pos, z, mask, t)
    sum(v.square().sum() for v in out.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused


def test_cnn_denoiser_trains():
    torch.manual_seed(0)
    model = zoo.cnn_denoiser(channels=2, width=8, depth=2)
    g = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.avg_pool3d(torch.rand(2, 2, 16, 16, 16, generator=g), 3, 1, 1)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=g)
    losses = _train(model, lambda: (model(noisy) - clean).square().mean())
    assert losses[-1] < 0.9 * losses[0]


def test_builders_take_kwargs_and_count_parameters():
    counts = {
        name: sum(p.numel() for p in getattr(zoo, name)().parameters())
        for name in ("transformer_force_field", "transformer_velocity", "egnn_force_field", "egnn_velocity", "cnn_denoiser")
    }
    assert all(10_000 < n < 500_000 for n in counts.values()), counts
    small = zoo.transformer_force_field(hidden=16, layers=1, heads=2, n_species=20)
    assert sum(p.numel() for p in small.parameters()) < counts["transformer_force_field"]
    with pytest.raises(ValueError):
        zoo.transformer_velocity(hidden=30, heads=4)

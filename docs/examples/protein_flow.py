"""Train a tiny non-equivariant Cα flow model with rotation augmentation, then audit its checkpoints.

    pip install "equiaudit[structures]"
    python docs/examples/protein_flow.py              # writes protein_example/ (a few minutes on a CPU)
    equiaudit audit sample_configs/protein_flow.yaml --out protein_example/out

The model is the zoo's transformer over residue tokens (``transformer_velocity``: attention over
Cα coordinates, nothing equivariant in it), trained Proteina-style — Cα in nm, centred, centred
Gaussian noise, ``x_t = (1 − t)·x0 + t·x1``, regress the velocity ``x1 − x0``, each structure under a
fresh Haar rotation — on the committed real structures (``tests/data/structures``: 1A8O, 2BEG,
3JQH) and on generated ideal α-helices and β-strands (random lengths and residue types: there are
only four real files). It saves its weights at log-spaced steps to ``protein_example/run/``, writes
the audit's structures to ``protein_example/structures/`` (the real files and 28 held-out ideal
chains as Cα-only PDB files) and audits every checkpoint with the protein preset on them: REE per
checkpoint, and per fixed flow time t for the last one. Everything is seeded: the numbers repeat.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import equiaudit
from equiaudit.actions import centre
from equiaudit.io.data import load_dataset
from equiaudit.rotations import haar_rotations
from equiaudit.zoo import transformer_velocity
from equiaudit.zoo.train import TrainSettings, train

ROOT = Path(__file__).resolve().parents[2]
STRUCTURES = ROOT / "tests" / "data" / "structures"
MAX_RESIDUES = 64
STEPS = 300


def ideal_chain(kind: str, length: int, generator: torch.Generator) -> torch.Tensor:
    """Cα coordinates ``(length, 3)`` in nm of an ideal α-helix (3.6 residues per turn, radius
    0.23 nm, rise 0.15 nm) or β-strand (rise 0.33 nm, zigzag ±0.1 nm), randomly oriented."""
    i = torch.arange(length, dtype=torch.float64)
    if kind == "helix":
        angle = i * (2 * math.pi / 3.6)
        xyz = torch.stack([0.23 * torch.cos(angle), 0.23 * torch.sin(angle), 0.15 * i], dim=-1)
    else:
        xyz = torch.stack([0.1 * (-1) ** i, torch.zeros_like(i), 0.33 * i], dim=-1)
    r = haar_rotations(1, generator, dtype=torch.float64)[0]
    return xyz @ r.T


def training_data(n_generated: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """The real structures (Cα, nm, cropped) plus ideal helices and strands, padded to MAX_RESIDUES."""
    real = load_dataset(STRUCTURES, structures={"units": "nm", "max_residues": MAX_RESIDUES})
    g = torch.Generator().manual_seed(seed)
    n = len(real["pos"]) + n_generated
    pos = torch.zeros(n, MAX_RESIDUES, 3, dtype=torch.float64)
    residue = torch.full((n, MAX_RESIDUES), 20, dtype=torch.int64)
    mask = torch.zeros(n, MAX_RESIDUES, dtype=torch.bool)
    width = real["pos"].shape[1]
    pos[: len(real["pos"]), :width], residue[: len(real["pos"]), :width] = real["pos"], real["residue"]
    mask[: len(real["pos"]), :width] = real["mask"]
    for row in range(len(real["pos"]), n):
        length = int(torch.randint(16, MAX_RESIDUES + 1, (1,), generator=g))
        kind = "helix" if row % 2 else "strand"
        pos[row, :length] = ideal_chain(kind, length, g)
        residue[row, :length] = torch.randint(0, 20, (length,), generator=g)
        mask[row, :length] = True
    return {"pos": pos.float(), "residue": residue, "mask": mask}


THREE_LETTER = ("ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL").split()


def write_ca_pdb(path: Path, ca_nm: torch.Tensor, residue: torch.Tensor) -> None:
    """A Cα-only PDB file (chain A, Å) of one generated chain."""
    lines = [f"ATOM  {i + 1:5d}  CA  {THREE_LETTER[int(r)]} A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
             for i, ((x, y, z), r) in enumerate(zip((10 * ca_nm).tolist(), residue.tolist()))]
    path.write_text("\n".join([*lines, "TER", "END"]) + "\n")


def audit_structures(folder: Path, n_generated: int = 28, seed: int = 1) -> Path:
    """The audit's structures: the real ones and ``n_generated`` held-out ideal chains written as PDB files."""
    folder.mkdir(parents=True, exist_ok=True)
    for real in STRUCTURES.glob("*.gz"):
        (folder / real.name).write_bytes(real.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in range(n_generated):
        length = int(torch.randint(16, MAX_RESIDUES + 1, (1,), generator=g))
        kind = "helix" if i % 2 else "strand"
        write_ca_pdb(folder / f"ideal_{kind}_{i:02d}.pdb", ideal_chain(kind, length, g), torch.randint(0, 20, (length,), generator=g))
    return folder


def proteina_loss(model, batch, generator):
    """Proteina's flow-matching loss under rotation augmentation (one Haar rotation per structure)."""
    pos, mask = batch["pos"], batch["mask"]
    r = haar_rotations(len(pos), generator, dtype=pos.dtype)
    x1 = centre(pos, mask) @ r.transpose(-1, -2)
    x0 = centre(torch.randn(pos.shape, generator=generator, dtype=pos.dtype), mask)
    t = torch.rand(len(pos), generator=generator, dtype=pos.dtype)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    v = model(x_t, t, batch["residue"], mask)["velocity"]
    weight = mask[..., None].to(v.dtype)
    return ((v - (x1 - x0)).square() * weight).sum() / (3 * weight.sum())


def main(out: Path = Path("protein_example")) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    data = training_data()
    model = transformer_velocity(hidden=32, layers=2, heads=4, n_species=21)
    steps = []

    def save(step, trained, record):
        torch.save(trained.state_dict(), run / f"step_{step:05d}.pt")
        steps.append(step)
        print(f"step {step:4d}  held-out loss {record['held_out_loss']:.3f}", flush=True)

    train(model, proteina_loss, data, data, TrainSettings(steps=STEPS, batch_size=16, lr=3e-3, seed=0),
          on_checkpoint=save)

    # The audit: the protein preset on the real structures and held-out ideal chains, the same
    # rotations, noise and times for every checkpoint (common random numbers).
    structures = audit_structures(out / "structures")
    auditor = equiaudit.Auditor(str(structures), config={"data": {"max_residues": MAX_RESIDUES}},
                                task="protein_flow", rotations=16, seed=0, device="cpu", breakdown={"by": []})
    print(f"\n{'step':>5} {'loss_aug':>9} {'REE %':>7}  95% interval")
    last = None
    for step in steps:
        model.load_state_dict(torch.load(run / f"step_{step:05d}.pt", weights_only=True))
        last = auditor(model)
        total = last.total
        print(f"{step:>5} {total.loss_aug:>9.4f} {100 * total.rel_equiv_error:>7.2f}  "
              f"[{100 * total.rel_equiv_error_ci_low:.2f}, {100 * total.rel_equiv_error_ci_high:.2f}]")
    print(f"\nREE per flow time t at step {steps[-1]}:")
    for row in last.breakdown:
        if row["by"] == "t" and row["head"] == "total":
            print(f"  t = {row['bin']:<5} REE {100 * row['rel_equiv_error']:6.2f} %")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("protein_example"))

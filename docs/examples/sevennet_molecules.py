"""Audit a published equivariant potential, SevenNet-0, on small molecules from ASE's g2 set.

    pip install -e ".[sevennet]"
    python docs/examples/sevennet_molecules.py              # writes sevennet_example/
    equiaudit audit sevennet_example/audit.yaml --out sevennet_example/out

Writes ``sevennet_example/molecules.db``, an ASE database of the g2 molecules made of H, C, N
and O with 3 atoms or more (72), labelled by ASE's EMT calculator (a cheap stand-in
labeller shipped with ASE, not DFT: the losses are against EMT, the equivariance figures do
not depend on the labels), and ``sevennet_example/audit.yaml``, which builds SevenNet's
network through ``equiaudit.zoo.sevennet`` and audits the ``7net-0`` checkpoint its wheel
ships (nothing is downloaded). SevenNet is E(3)-equivariant by construction: its REE must
read at the float floor, and does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ELEMENTS = {"H", "C", "N", "O"}


def write_molecules(path: Path, names: list[str] | None = None) -> int:
    """Write the g2 molecules (``names``, or all of H/C/N/O with ≥ 3 atoms) with EMT labels; returns how many."""
    from ase.calculators.emt import EMT
    from ase.collections import g2
    from ase.db import connect

    if names is None:
        names = [n for n in g2.names if set(g2[n].get_chemical_symbols()) <= ELEMENTS and len(g2[n]) >= 3]
    path.unlink(missing_ok=True)
    with connect(path) as db:
        for name in names:
            atoms = g2[name]
            atoms.calc = EMT()
            atoms.get_potential_energy()  # energy and forces, stored with the row
            db.write(atoms, name=name)
    return len(names)


def write_example(folder: Path, names: list[str] | None = None, rotations: int = 16, checkpoint: str = "7net-0") -> Path:
    """``folder/molecules.db`` and ``folder/audit.yaml``; returns the config's path."""
    from equiaudit.zoo.sevennet import resolve_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    write_molecules(folder / "molecules.db", names)
    config = {
        "task": "force_field",
        "model": {
            "factory": "equiaudit.zoo.sevennet:sevennet_force_field",
            "kwargs": {"checkpoint": checkpoint},  # the architecture, from the checkpoint's config
            "grad": True,  # forces = -dE/dpos by autograd
        },
        "checkpoints": {"path": str(resolve_checkpoint(checkpoint))},  # the weights audited
        "data": {"path": "molecules.db"},
        "group": {"name": "so3", "rotations": rotations},
        "seed": 0,
        # No chunk_size: `auto` measures how many rotated molecules per forward pass are fastest
        # within the memory budget (docs/speed.md). It used to be set by hand (64): a fixed 8192
        # put 1024 graphs in a pass, 8 GB and 2.5x the time.
    }
    (folder / "audit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "audit.yaml"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sevennet_example")
    config = write_example(out)
    print(f"wrote {out / 'molecules.db'} and {config}; now: equiaudit audit {config} --out {out / 'out'}")

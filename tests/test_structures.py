"""PDB/mmCIF structures as data (gemmi): the same entry in both formats, chains, masks, units, gzip, bad files."""

import gzip
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gemmi")

from equiaudit.errors import DataError  # noqa: E402
from equiaudit.io.data import load_dataset  # noqa: E402
from equiaudit.io.data_structures import RESIDUE_TYPES  # noqa: E402

DATA = Path(__file__).parent / "data" / "structures"


def _plain(name: str, folder: Path) -> Path:
    """An uncompressed copy of a committed ``.gz`` structure."""
    out = folder / name.removesuffix(".gz")
    with gzip.open(DATA / name, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _pdb_lines(tmp_path) -> list[str]:
    return _plain("1A8O.pdb.gz", tmp_path).read_text().splitlines()


def _atom(line: str) -> tuple[str, int]:
    return line[12:16].strip(), int(line[22:26])


@pytest.mark.parametrize("options", [{}, {"atoms": "backbone", "frames": True}, {"atoms": "heavy", "units": "nm"}])
def test_pdb_and_mmcif_of_one_entry_give_identical_tensors(tmp_path, options):
    pdb = load_dataset(DATA / "1A8O.pdb.gz", structures=options)
    cif = load_dataset(DATA / "1A8O.cif.gz", structures=options)
    assert pdb.keys() == cif.keys()
    for name in pdb:
        assert torch.equal(pdb[name], cif[name]), name
    # gzip changes nothing: the uncompressed files read the same
    plain = load_dataset(_plain("1A8O.cif.gz", tmp_path), structures=options)
    assert all(torch.equal(plain[k], cif[k]) for k in cif)


def test_ca_fields_hetero_groups_and_tokens(tmp_path):
    data = load_dataset(DATA / "1A8O.pdb.gz")
    lines = _pdb_lines(tmp_path)
    # 70 amino acids; waters (HOH) dropped; the chain's first residue is MSE (a HETATM) read as MET
    ca = [ln for ln in lines if ln.startswith(("ATOM", "HETATM")) and ln[12:16] == " CA " and ln[17:20] != "HOH"]
    assert data["pos"].shape == (1, len(ca), 3) == (1, 70, 3)
    assert ca[0][17:20] == "MSE" and data["residue"][0, 0] == RESIDUE_TYPES.index("M")
    first = torch.tensor([float(ca[0][30:38]), float(ca[0][38:46]), float(ca[0][46:54])], dtype=torch.float64)
    assert torch.equal(data["pos"][0, 0], first)  # Å, as stored
    assert data["mask"].all() and data["length"].tolist() == [70] and not data["chain_break"].any()
    assert "z" not in data  # all carbons under CA: not a field
    nm = load_dataset(DATA / "1A8O.pdb.gz", structures={"units": "nm"})
    assert torch.allclose(nm["pos"] * 10, data["pos"], rtol=1e-15, atol=0)


def test_folder_pads_with_mask_and_crops(tmp_path):
    data = load_dataset(DATA)  # four files, sorted: 1A8O (cif, pdb), 2BEG (5 chains), 3JQH
    assert data["length"].tolist() == [70, 70, 130, 23]
    assert data["mask"].sum(1).tolist() == [70, 70, 130, 23] and data["pos"].shape[1] == 130
    assert data["pos"][3, 23:].abs().max() == 0 and data["residue"][3, 23:].eq(20).all()
    crop = load_dataset(DATA, structures={"max_residues": 30})
    assert crop["pos"].shape[1] == 30 and torch.equal(crop["pos"][:, :23], data["pos"][:, :23])
    listed = tmp_path / "entries.txt"
    listed.write_text(f"# two entries\n{DATA / '3JQH.cif.gz'}\n{DATA / '2BEG.pdb.gz'}\n")
    both = load_dataset(listed)
    assert both["length"].tolist() == [23, 130]


def test_chain_selection_order_and_positions():
    data = load_dataset(DATA / "2BEG.pdb.gz", structures={"chains": ["C", "A"]})
    assert data["length"].tolist() == [52]
    assert data["chain"][0].tolist() == [0] * 26 + [1] * 26
    assert data["position"][0].tolist() == list(range(26)) * 2
    every = load_dataset(DATA / "2BEG.pdb.gz")
    # chain C is the third chain of the file: its residues 52 … 77
    assert torch.equal(data["pos"][0, :26], every["pos"][0, 52:78])
    assert torch.equal(data["pos"][0, 26:], every["pos"][0, :26])


def test_missing_atoms_and_gaps_are_masked_not_guessed(tmp_path):
    lines = _pdb_lines(tmp_path)
    # residue 160 loses its N; residue 165 its CA; residues 180-182 are missing altogether
    kept = [ln for ln in lines if not (ln.startswith(("ATOM", "HETATM")) and (
        _atom(ln) in (("N", 160), ("CA", 165)) or 180 <= _atom(ln)[1] <= 182))]
    path = tmp_path / "edited.pdb"
    path.write_text("\n".join(kept) + "\n")
    full = load_dataset(DATA / "1A8O.pdb.gz", structures={"atoms": "backbone"})
    ca = load_dataset(path)
    numbers = [151 + i for i in range(70) if not 180 <= 151 + i <= 182]
    index = {n: i for i, n in enumerate(numbers)}
    assert ca["pos"].shape[1] == 67 and ca["length"].tolist() == [66]  # 165 has no CA
    assert ca["mask"][0].tolist() == [n != 165 for n in numbers]
    assert ca["pos"][0, index[165]].abs().max() == 0  # not interpolated
    assert ca["chain_break"][0].nonzero().flatten().tolist() == [index[183]]
    assert ca["position"][0, index[183]] == 183 - 151  # the gap counts along the chain
    framed = load_dataset(path, structures={"frames": True})  # a frame needs N, CA and C
    assert framed["mask"][0].tolist() == [n not in (160, 165) for n in numbers]
    assert torch.equal(framed["frames_mask"], framed["mask"])
    assert torch.equal(framed["frames"][0, index[160]], torch.eye(3, dtype=torch.float64))
    bb = load_dataset(path, structures={"atoms": "backbone"})
    slots = bb["mask"][0].reshape(-1, 4)
    assert slots[index[160]].tolist() == [False, True, True, True] and slots[index[165]].tolist() == [True, False, True, True]
    assert slots.sum() == 67 * 4 - 2
    assert torch.equal(bb["pos"][0].reshape(-1, 4, 3)[index[161]], full["pos"][0].reshape(-1, 4, 3)[161 - 151])
    assert bb["z"][0, :4].tolist() == [7, 6, 6, 8]


def test_first_model_and_first_altloc(tmp_path):
    atoms = [ln for ln in _pdb_lines(tmp_path) if ln.startswith(("ATOM", "HETATM")) and 151 <= _atom(ln)[1] <= 153]
    moved = [ln[:30] + f"{float(ln[30:38]) + 50:8.3f}" + ln[38:] for ln in atoms]
    # residue 152's CA in two conformers: A (kept), then B shifted
    ca152 = next(i for i, ln in enumerate(atoms) if _atom(ln) == ("CA", 152))
    first = atoms[ca152][:16] + "A" + atoms[ca152][17:54] + "  0.60" + atoms[ca152][60:]
    second = atoms[ca152][:16] + "B" + atoms[ca152][17:30] + f"{float(atoms[ca152][30:38]) + 1:8.3f}" + atoms[ca152][38:54] + "  0.40" + atoms[ca152][60:]
    model_1 = atoms[:ca152] + [first, second] + atoms[ca152 + 1:]
    path = tmp_path / "two_models.pdb"
    path.write_text("\n".join(["MODEL        1", *model_1, "ENDMDL", "MODEL        2", *moved, "ENDMDL", "END"]) + "\n")
    data = load_dataset(path)
    assert data["pos"].shape == (1, 3, 3)
    x = torch.tensor([float(ln[30:38]) for ln in atoms if ln[12:16] == " CA "], dtype=torch.float64)
    assert torch.equal(data["pos"][0, :, 0], x)  # model 1, conformer A


def test_unreadable_file_is_listed_and_skipped(tmp_path, capfd):
    folder = tmp_path / "structures"
    folder.mkdir()
    shutil.copy(DATA / "3JQH.cif.gz", folder)
    (folder / "broken.cif").write_text("data_x\n_atom_site.id\nnot a table\n")
    (folder / "damaged.pdb.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    (folder / "water.pdb").write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00  0.00           O\nEND\n")
    data = load_dataset(folder)
    assert data["length"].tolist() == [23]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("equiaudit: skipped ") for line in err)
    assert {Path(line.split()[2].rstrip(":")).name for line in err} == {"broken.cif", "damaged.pdb.gz", "water.pdb"}
    with pytest.raises(DataError, match="broken.cif"):
        load_dataset(folder, structures={"strict": True})
    with pytest.raises(DataError, match="no chain 'Z'"):
        load_dataset(DATA / "3JQH.cif.gz", structures={"chains": ["Z"], "strict": True})
    with pytest.raises(DataError, match="data.atoms"):
        load_dataset(DATA / "3JQH.cif.gz", structures={"atoms": "all"})


def test_cache_identity_sees_a_structure_edited_in_a_folder(tmp_path):
    import os

    from equiaudit.api import settings
    from equiaudit.io.cache import settings_identity

    folder = tmp_path / "structures"
    folder.mkdir()
    entry = folder / "3JQH.cif.gz"
    shutil.copy(DATA / "3JQH.cif.gz", entry)
    config = settings({"model": {"factory": "equiaudit.zoo:egnn_velocity"}, "data": {"path": str(folder)}}, task="protein_flow")
    before = settings_identity(config)
    stat = folder.stat()
    entry.write_bytes(entry.read_bytes() + b"")  # same size, new mtime
    os.utime(entry, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the folder's own stamp unchanged
    assert settings_identity(config)["data"] != before["data"]

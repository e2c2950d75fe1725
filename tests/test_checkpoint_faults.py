"""Hostile and broken checkpoint files (issue 11): each case is reproduced here, in tmp_path,
and must now end as one clean per-checkpoint ``CheckpointError`` — never a hang, a blown
memory budget, a traceback or code from the file running.

Cases that could hang or eat memory if a guard regressed run in a subprocess under
``RLIMIT_AS`` and a timeout (:func:`bounded`), so a regression fails the test instead of
the machine.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickletools
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.errors import CheckpointError
from equiaudit.io import safe_load
from equiaudit.io.checkpoints import describe_checkpoint, discover_checkpoints, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 1536 * 2**20  # importing torch takes ~650 MB of address space; the bombs wanted 2-4.5 GB


def sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict()


def bounded(code: str, timeout: float = 60) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter capped at
    ``MEMORY_LIMIT`` bytes of address space and ``timeout`` seconds; returns that JSON."""
    prelude = textwrap.dedent(f"""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        sys.path.insert(0, {str(ROOT)!r})
        from equiaudit.errors import CheckpointError
        from equiaudit.io.checkpoints import describe_checkpoint, discover_checkpoints, read_checkpoint
        def outcome(fn, *args, **kwargs):
            start = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
                return {{"ok": True, "seconds": time.perf_counter() - start, "value": str(value)[:3000]}}
            except CheckpointError as exc:
                return {{"ok": False, "status": exc.status, "message": str(exc), "seconds": time.perf_counter() - start}}
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- pickle surgery


def patched_save(obj: dict, path: Path, placeholder: str, replacement: bytes) -> None:
    """``torch.save(obj)``, with the pickled string ``placeholder`` swapped for raw opcodes
    (which must leave exactly one object on the stack). Memo slots >= 100000 keep clear of torch's."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    encoded = placeholder.encode()
    needle = b"X" + struct.pack("<I", len(encoded)) + encoded  # BINUNICODE
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            payload = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert payload.count(needle) == 1
                payload = payload.replace(needle, replacement)
            target.writestr(info, payload)


def shared_tuple(depth: int) -> bytes:
    """Opcodes for t_depth with t_0 = ('x',), t_k+1 = (t_k, t_k): a few bytes per level,
    2^depth leaves when expanded (what hashing or str() of it visits)."""
    out = bytearray(b"X\x01\x00\x00\x00x\x85r" + struct.pack("<I", 100000))  # 'x', TUPLE1, LONG_BINPUT
    for k in range(depth):
        out += b"j" + struct.pack("<I", 100000 + k) + b"\x86r" + struct.pack("<I", 100001 + k)  # GET, TUPLE2, PUT
    return bytes(out)


def shared_list(depth: int) -> bytes:
    """Like :func:`shared_tuple` with lists, L_k+1 = [L_k, L_k], all levels wrapped in one
    tuple (the weights-only unpickler has no POP): never hashed, so cheap to load, but a
    str() or an unbounded walk of it would never end."""
    out = bytearray(b"(]r" + struct.pack("<I", 200000))  # MARK, EMPTY_LIST, LONG_BINPUT
    for k in range(depth):
        get = b"j" + struct.pack("<I", 200000 + k)
        out += b"](" + get + get + b"er" + struct.pack("<I", 200001 + k)  # [], MARK, GET, GET, APPENDS, PUT
    return bytes(out + b"t")  # TUPLE


def opcode_counts(path: Path) -> dict[str, int]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    counts: dict[str, int] = {}
    for op, _, _ in pickletools.genops(data):
        counts[op.name] = counts.get(op.name, 0) + 1
    return counts


# --------------------------------------------------------------------------- non-str keys


@pytest.mark.parametrize("obj, where", [
    ({0: torch.ones(2), 1: torch.zeros(2)}, "state_dict"),
    ({"state_dict": {0: torch.ones(2), "b": torch.zeros(2)}, "step": 3}, "state_dict"),
])
def test_integer_keys_are_a_clean_error_and_inspect_works(tmp_path, obj, where):
    torch.save(obj, tmp_path / "step_3.pt")
    refs = discover_checkpoints([tmp_path])  # used to abort the run (AttributeError ... split)
    assert [(r.name, r.step) for r in refs] == [("step_3.pt", 3)]
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(refs[0])
    assert err.value.status == "no_weights"
    assert str(err.value).startswith("step_3.pt: ") and f"in {where} are keyed by int, not by parameter name" in str(err.value)

    info = describe_checkpoint(tmp_path / "step_3.pt")  # used to raise TypeError
    assert info["status"] == "no_weights" and "keyed by int" in info["problem"]
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "step_3.pt")])
    assert result.exit_code == 1 and "keyed by int" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- file names


def _make_or_skip(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses names that are not UTF-8")


def test_names_that_are_not_utf8_are_shown_escaped(tmp_path):
    run = tmp_path / os.fsdecode(b"run_\xff")
    try:
        run.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    buffer = io.BytesIO()
    torch.save({"model_state_dict": sd(1), "step": 7}, buffer)
    good = run / os.fsdecode(b"weights_\xff.pt")
    _make_or_skip(good, buffer.getvalue())
    bad = run / os.fsdecode(b"step_9_\xfe\n.pt")
    _make_or_skip(bad, b"garbage")

    refs = discover_checkpoints([run])
    assert [(r.name, r.run, r.step, r.step_source) for r in refs] == [
        ("weights_\\xff.pt", "run_\\xff", 7, "file"),  # the step was read from inside: the file opened
        ("step_9_\\xfe\\n.pt", "run_\\xff", 9, "name"),
    ]
    assert refs[0].path == good
    for ref in refs:  # display strings encode anywhere (the run aborted with UnicodeEncodeError)
        ref.name.encode("ascii"), ref.run.encode("ascii")
    assert read_checkpoint(refs[0]).step == 7
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(refs[1])
    assert err.value.status == "corrupt" and str(err.value).startswith("step_9_\\xfe\\n.pt: ")
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["inspect", os.fsdecode(good), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.output)["path"].endswith("run_\\xff/weights_\\xff.pt")
    assert CliRunner().invoke(app, ["inspect", os.fsdecode(good)]).exit_code == 0


# --------------------------------------------------------------------------- amplification


def test_shared_tuple_keys_are_refused_before_hashing(tmp_path):
    # The file: dict keys sharing one sub-object 2^27 times. Unpickling alone hashes
    # every expanded element (0.4 s at 2^25, doubling per level); str() of the keys took 54 s
    # and 2.2 GB, one level deeper MemoryError.
    for depth in (27, 40):
        path = tmp_path / f"step_{depth}.pt"
        patched_save({"state_dict": {"KEY": torch.ones(2)}, "step": 1}, path, "KEY", shared_tuple(depth))
        assert path.stat().st_size < 10_000 and opcode_counts(path)["TUPLE2"] == depth  # small, and 2^depth when expanded
    result = bounded(f"""
        out = {{}}
        for depth in (27, 40):
            path = {str(tmp_path)!r} + f"/step_{{depth}}.pt"
            out[depth] = [outcome(discover_checkpoints, [path]), outcome(read_checkpoint, path),
                          outcome(describe_checkpoint, path)]
        print(json.dumps(out))
    """)
    for depth, (found, read, described) in result.items():
        assert found["ok"] and read["status"] == described["status"] == "too_large", result
        assert "PICKLE_WORK_PER_BYTE" in read["message"] and len(read["message"]) < 300
        assert max(found["seconds"], read["seconds"], described["seconds"]) < 5


def test_shared_structures_are_never_stringified(tmp_path):
    # Within the hashing budget (2^19 elements) a tuple key still loads; as a key of the
    # weights it is refused by type. A list shared 2^60 times is never hashed at all, so it
    # loads instantly — and must never be str()ed or walked without bound.
    patched_save({"state_dict": {"KEY": torch.ones(2), "b": torch.ones(2)}}, tmp_path / "keys.pt", "KEY", shared_tuple(19))
    patched_save({"model_state_dict": sd(1), "meta": "META", "step": 4}, tmp_path / "meta.pt", "META", shared_list(60))
    result = bounded(f"""
        d = {str(tmp_path)!r}
        print(json.dumps({{
            "keys": [outcome(read_checkpoint, d + "/keys.pt"), outcome(describe_checkpoint, d + "/keys.pt")],
            "meta": [outcome(read_checkpoint, d + "/meta.pt"), outcome(describe_checkpoint, d + "/meta.pt"),
                     outcome(discover_checkpoints, [d])],
        }}))
    """)
    read, described = result["keys"]
    assert read["status"] == "no_weights" and "keyed by tuple" in read["message"] and "(e.g. <tuple>)" in read["message"]
    assert len(read["message"]) < 300 and read["seconds"] < 5
    assert described["ok"] and "keys str/tuple" in described["value"], described
    for outcome in result["meta"]:
        assert outcome["ok"] and outcome["seconds"] < 5, result


def _deflated(path: Path) -> None:
    """Re-zip a torch.save file with every member deflated (torch itself never compresses)."""
    data = path.read_bytes()
    source = zipfile.ZipFile(io.BytesIO(data))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "step_1.pt"
    torch.save({"state_dict": {"w": torch.zeros(2**24)}, "step": 1}, path)  # 64 MiB of zeros
    _deflated(path)
    infos = zipfile.ZipFile(path).infolist()
    declared = sum(i.file_size for i in infos)
    assert path.stat().st_size < 2**20 and declared > 64 * 2**20  # < 1 MiB on disk, > 64 MiB inflated
    result = bounded(f"""
        path = {str(path)!r}
        print(json.dumps([outcome(discover_checkpoints, [path]), outcome(read_checkpoint, path)]))
    """)
    found, read = result
    assert found["ok"] and read["status"] == "too_large", result
    assert "over the 20x limit for compressed members (MAX_COMPRESSION_RATIO" in read["message"]

    # A small compressed file (a hand-made zip of a tiny model) still loads.
    torch.save(sd(1), tmp_path / "small.pt")
    _deflated(tmp_path / "small.pt")
    assert read_checkpoint(tmp_path / "small.pt").format == "state_dict"


def test_declared_size_limit(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2**19)}, tmp_path / "two_mib.pt")  # stored, 2 MiB
    monkeypatch.setattr(safe_load, "MAX_UNCOMPRESSED_BYTES", 2**20)
    with pytest.raises(CheckpointError, match=r"declares 2\.0 MiB of data, over the 1\.0 MiB limit \(MAX_UNCOMPRESSED_BYTES\)") as err:
        read_checkpoint(tmp_path / "two_mib.pt")
    assert err.value.status == "too_large"


# --------------------------------------------------------------------------- discovery


def test_glob_through_symlink_loops_finds_each_file_once(tmp_path):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    for i, rel in enumerate(["a.pt", "c.pt", "sub/b.pt", "sub/d.pt"]):
        torch.save(sd(i), run / rel)
    (run / "sub" / "up").symlink_to("..")
    # With one loop, glob.glob evaluates 4 files 164 times (a fake run "up" appears) ...
    one = subprocess.run([sys.executable, "-c", f"import glob; print(len(glob.glob({str(run)!r} + '/**/*.pt', recursive=True)))"],
                         capture_output=True, text=True, timeout=30)
    assert int(one.stdout) > 100
    (run / "sub" / "self").symlink_to("../sub")
    (run / "here").symlink_to(".")
    # ... with three, it never ends.
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", f"import glob; glob.glob({str(run)!r} + '/**/*.pt', recursive=True)"],
                       capture_output=True, timeout=2)

    result = bounded(f"""
        refs = discover_checkpoints([{str(run)!r} + "/**/*.pt"])
        print(json.dumps([[r.run, r.name] for r in refs]))
    """, timeout=60)
    assert sorted(map(tuple, result)) == [("run", "a.pt"), ("run", "c.pt"), ("sub", "b.pt"), ("sub", "d.pt")]


def test_fifo_is_never_opened(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(sd(1), run / "step_1.pt")
    os.mkfifo(run / "step_2.pt")
    hf = run / "checkpoint-3"
    hf.mkdir()
    from safetensors.torch import save_file

    save_file(sd(1), hf / "model.safetensors")
    os.mkfifo(hf / "trainer_state.json")  # read as JSON for the step: must not block either
    result = bounded(f"""
        run = {str(run)!r}
        skipped = []
        by_glob = [r.name for r in discover_checkpoints([run + "/*.pt"], skipped=skipped)]
        by_dir = [r.name for r in discover_checkpoints([run])]
        explicit = discover_checkpoints([run + "/step_2.pt"])
        print(json.dumps({{"glob": by_glob, "dir": by_dir, "skipped": skipped, "explicit": [r.name for r in explicit],
                           "read": outcome(read_checkpoint, explicit[0]), "hf": outcome(read_checkpoint, run + "/checkpoint-3")}}))
    """, timeout=60)
    assert result["glob"] == ["step_1.pt"] and result["dir"] == ["step_1.pt", "checkpoint-3"]
    assert result["skipped"] == [[str(run / "step_2.pt"), "a FIFO, not a regular file: not opened"]]
    assert result["explicit"] == ["step_2.pt"]
    assert result["read"]["status"] == "unreadable"
    assert result["read"]["message"] == "step_2.pt: a FIFO, not a regular file: not opened"
    assert result["hf"]["ok"]


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_corrupt_not_unreadable(tmp_path, legacy):
    path = tmp_path / "step_5.pt"
    torch.save({"state_dict": {"w": torch.randn(300, 300)}, "step": 5}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 10])
    assert discover_checkpoints([path])[0].step == 5  # from the name: the peek failed quietly
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert err.value.status == "corrupt", str(err.value)  # was "unreadable" ("Invalid argument", mmap)


# --------------------------------------------------------------------------- code in pickles


class _Evil:
    """Unpickling this calls ``func(*args)``: the classic arbitrary-code pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _calls(path: Path) -> set[str]:
    """Globals a torch.save file's pickle imports and then calls (GLOBAL then REDUCE), read
    from the opcodes without unpickling anything."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    calls, last = set(), None
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            last = arg.replace(" ", ".")
        elif op.name == "REDUCE" and last is not None:
            calls.add(last)
    return calls


def _payloads(marker: Path) -> dict[str, tuple[_Evil, str]]:
    return {
        # (payload, the global's name in the pickle: protocol 2 writes builtins as __builtin__)
        "os.system": (_Evil(os.system, f"touch {marker}"), f"{os.name}.system"),
        "exec": (_Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "__builtin__.exec"),
        "eval": (_Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "__builtin__.eval"),
        "subprocess": (_Evil(subprocess.Popen, ["touch", str(marker)]), "commands.Popen"),
    }


LAYOUTS = {
    # where the payload hides: (files to write {name: obj}, file to read)
    "ema_sibling": lambda evil: ({"epoch=0-step=1.ckpt": {"state_dict": sd(1), "global_step": 1},
                                  "epoch=0-step=1-EMA.ckpt": {"state_dict": sd(2), "global_step": 1, "x": evil}},
                                 "epoch=0-step=1.ckpt"),
    "nested_model": lambda evil: ({"chgnet.pth.tar": {"model": {"state_dict": sd(1), "model_args": evil}}},
                                  "chgnet.pth.tar"),
    "ema_file": lambda evil: ({"step_1.pt": {"model_state_dict": sd(1), "step": 1},
                               "ema_step_1.pt": {"decay": 0.99, "shadow_params": list(sd(2).values()), "x": evil}},
                              "step_1.pt"),
    "numpy_config": lambda evil: ({"sevennet.pth": {"model_state_dict": sd(1), "epoch": 3,
                                                    "config": {"shift": np.arange(3.0), "hook": evil}}},
                                  "sevennet.pth"),
    "optimizer_ema": lambda evil: ({"a.ckpt": {"state_dict": sd(1), "global_step": 2, "pytorch-lightning_version": "2",
                                               "optimizer_states": [{"ema": list(sd(2).values()), "hook": evil}]}},
                                   "a.ckpt"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("payload", ["os.system", "exec", "eval", "subprocess"])
def test_code_in_every_new_path_is_refused_and_never_runs(tmp_path, layout, payload):
    if payload in ("os.system", "subprocess") and os.name != "posix":
        pytest.skip("needs `touch`")
    marker = tmp_path / "marker"
    evil, called = _payloads(marker)[payload]
    files, target = LAYOUTS[layout](evil)
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    hostile = next(name for name, obj in files.items() if any(v is evil for v in _values(obj)))
    assert called in _calls(tmp_path / hostile)  # the fixture really calls it on load

    refs = discover_checkpoints([tmp_path])  # discovery peeks inside every file
    assert refs, layout
    for weights in ("auto", "ema", "raw"):
        try:
            read_checkpoint(tmp_path / target, weights=weights)
        except CheckpointError as exc:
            assert exc.status in ("unsafe_pickle", "no_ema"), str(exc)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / hostile, weights="auto")
    assert err.value.status == "unsafe_pickle" and "never executes pickled code" in str(err.value)
    with pytest.raises(CheckpointError):
        describe_checkpoint(tmp_path / hostile)
    if hostile != target:  # the payload sits in the EMA sibling: auto reaches it, raw does not
        with pytest.raises(CheckpointError, match=r"^EMA sibling ") as err:
            read_checkpoint(tmp_path / target)
        assert err.value.status == "unsafe_pickle"
    assert not marker.exists()


def _values(obj) -> list:
    out = []
    for value in obj.values() if isinstance(obj, dict) else obj:
        out += _values(value) if isinstance(value, (dict, list)) else [value]
    return out


class TinyPotential(nn.Module):
    def __init__(self):
        super().__init__()
        self.readout = nn.Linear(3, 1)


@pytest.mark.parametrize("name", ["MACE.model", "best_model"])
def test_whole_pickled_model_gets_the_safe_route(tmp_path, name):
    # MACE's `.model` and SchNetPack's `best_model` are torch.save(model): only code can load them.
    torch.save(TinyPotential(), tmp_path / name)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / name)
    message = str(err.value)
    assert err.value.status == "unsafe_pickle" and "\n" not in message
    assert message.startswith(f"{name}: refused: a whole pickled model (the pickle needs `")
    assert "TinyPotential" in message and "training checkpoints" in message and "convert it once yourself" in message


def test_numpy_object_arrays_are_refused(tmp_path):
    torch.save({"model_state_dict": sd(1), "config": {"species": np.array([1, "H"], dtype=object)}}, tmp_path / "o.pth")
    with pytest.raises(CheckpointError, match=r"needs `numpy\.dtypes\.ObjectDType`") as err:
        read_checkpoint(tmp_path / "o.pth")
    assert err.value.status == "unsafe_pickle"


def test_numpy_data_loads(tmp_path):
    # SevenNet's config: numpy arrays and scalars (numpy 2 pickles numpy._core.multiarray.*).
    config = {"shift": np.arange(4.0, dtype=np.float32), "scale": np.float64(1.5), "n": np.int64(3),
              "names": np.array(["H", "O"])}
    torch.save({"model_state_dict": sd(1), "config": config, "epoch": 600}, tmp_path / "checkpoint_600.pth")
    ckpt = read_checkpoint(tmp_path / "checkpoint_600.pth")
    assert (ckpt.weights_source, ckpt.step, ckpt.step_source) == ("model_state_dict", 600, "epoch")
    assert set(safe_load.NUMPY_DATA_GLOBALS) == {
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar", "numpy.ndarray", "numpy.dtype"}

"""The TorchScript artifact: export -> load in a fresh process -> same numbers; the C++ program; every error."""

import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from conftest import ROOT, SHIPPED, SHIPPED_MODEL
from transip import native
from transip.checkpoint import model_from_checkpoint
from transip.data import Structure, collate, evaluate_batch, structure_from_atoms, write_extxyz_exact
from transip.export import FORMAT_VERSION, METHODS, ArtifactError, contract, export_checkpoint, load, read_metadata
from transip.export.halo import halo_energy_gradients
from transip.export.load import check_device, check_native_ops

KINDS = [(dtype, kernel) for dtype in ("float64", "float32") for kernel in ("fused", "reference")]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def aspirin() -> Structure:
    return structure_from_atoms(ase.io.read(ROOT / "examples" / "molecules" / "aspirin.xyz"), require_labels=False)


def periodic_box() -> Structure:
    """Two aspirins in a triclinic box, more than 12 A between opposite faces."""
    a = aspirin()
    cell = np.array([[13.0, 0.0, 0.0], [1.5, 12.5, 0.0], [-1.0, 1.0, 13.5]])
    positions = np.concatenate([a.positions, a.positions[:, ::-1] + 6.0])
    return Structure(np.concatenate([a.numbers, a.numbers]), positions, cell=cell, pbc=[True] * 3)


def python_reference(checkpoint, structure: Structure, dtype: str, kernel: str) -> dict:
    model = model_from_checkpoint(checkpoint, dtype=getattr(torch, dtype)).set_kernel(kernel)
    out = evaluate_batch(model, collate([structure], model.cutoff, dtype=getattr(torch, dtype)), compute_virial=True)
    return {"energy": out["energy"][0], "forces": out["forces"], "atom_energies": out["atom_energy"],
            "virial": out["virial"][0]}


def inputs_of(structure: Structure):
    cell = structure.cell if structure.periodic else np.zeros((3, 3))
    return (torch.tensor(structure.positions), torch.tensor(structure.numbers), torch.tensor(cell),
            torch.tensor(structure.pbc if structure.periodic else [False] * 3))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, engine_checkpoint):
    """Artifacts of every dtype and kernel of one model with repulsion and block geometry (and "checkpoint": its
    checkpoint)."""
    folder = tmp_path_factory.mktemp("artifacts")
    paths = {"checkpoint": engine_checkpoint}
    for dtype, kernel in KINDS:
        paths[dtype, kernel] = folder / f"model-{dtype}-{kernel}.pt"
        export_checkpoint(engine_checkpoint, paths[dtype, kernel], dtype=dtype, kernel=kernel)
    return paths


def assert_close(actual, expected, tol, what):
    actual = torch.as_tensor(actual, dtype=torch.float64)  # a Python float would become float32 by default
    expected = torch.as_tensor(expected).detach().double()
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= tol * scale, what


def test_artifacts_in_a_fresh_process_equal_the_checkpoint(artifacts, tmp_path):
    structures = {"molecule": aspirin(), "box": periodic_box()}
    torch.save({name: inputs_of(s) for name, s in structures.items()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch, transip.export as ex
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        paths = {{k: v for k, v in {json.dumps({f'{d}-{k}': str(p) for (d, k), p in ((kind, artifacts[kind]) for kind in KINDS)})}.items()}}
        results = {{}}
        for key, path in paths.items():
            module, metadata = ex.load(path)
            for name, args in inputs.items():
                out = module.compute(*args, 0, 1, True)
                results[key + "/" + name] = {{k: v.detach() for k, v in out.items()}}
        torch.save(results, {str(tmp_path / 'out.pt')!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for dtype, kernel in KINDS:
        for name, structure in structures.items():
            expected = python_reference(artifacts["checkpoint"], structure, dtype, kernel)
            got = results[f"{dtype}-{kernel}/{name}"]
            assert got["forces"].dtype == getattr(torch, dtype)
            for key in ("energy", "forces", "atom_energies", "virial"):
                assert_close(got[key], expected[key], TOLERANCE[dtype], f"{dtype} {kernel} {name} {key}")


@pytest.mark.parametrize("dtype,kernel", [("float64", "fused"), ("float64", "reference")])
def test_halo_exchange_methods_block_by_block(artifacts, dtype, kernel):
    """The halo recipe (export/halo.py, as pair_style transip runs it on several ranks) with one domain whose
    ghosts are periodic images one cell away: each block's ghost tokens are copied from their owners, the
    backward runs block by block with ghost gradients summed onto the owners, and the result is the periodic
    energy, forces and virial."""
    from transip.neighbors import structure_neighbors

    box = periodic_box()
    fractional = box.positions @ np.linalg.inv(box.cell)
    box = Structure(box.numbers, (fractional % 1.0) @ box.cell, cell=box.cell, pbc=box.pbc)
    module, metadata = load(artifacts[dtype, kernel])
    expected = module.compute(*inputs_of(box), 0, 1, True)
    n = len(box.numbers)
    shifts = [(a, b, c) for a in (0, -1, 1) for b in (0, -1, 1) for c in (0, -1, 1)]  # local atoms first
    positions = torch.tensor(np.concatenate([box.positions + np.array(o) @ box.cell for o in shifts]))
    owner = torch.arange(len(positions)) % n
    numbers = torch.tensor(box.numbers)[owner]
    edge_index, _ = structure_neighbors(positions, 6.0)
    receivers, senders = edge_index[:, edge_index[0] < n]  # local receivers only, grouped by receiver
    vectors = positions[senders] - positions[receivers]
    atom_energies, g = halo_energy_gradients(module, vectors, numbers, receivers, senders, owner,
                                             metadata["num_layers"], 0, 1)
    forces = torch.zeros(len(positions), 3, dtype=g.dtype).index_add(0, receivers, g).index_add(0, senders, -g)
    folded = torch.zeros(n, 3, dtype=g.dtype).index_add(0, owner, forces)
    energy = atom_energies.sum() + module.energy_offset(0, 1)
    assert_close(energy, expected["energy"], 1e-10, "energy")
    assert_close(atom_energies, expected["atom_energies"], 1e-10, "atom energies")
    assert_close(folded, expected["forces"], 1e-10, "forces")
    assert_close(-(g.t() @ vectors.detach()), expected["virial"], 1e-10, "virial")


@pytest.mark.parametrize("dtype,kernel", [("float64", "fused"), ("float32", "reference")])
def test_edge_energy_gradients_with_images_folded_onto_owners(artifacts, dtype, kernel):
    """The one-pass method pair_style transip uses on one rank: senders are the owners of periodic images, each
    edge keeps its image's displacement, and energies, forces and virial are the periodic ones."""
    from transip.neighbors import structure_neighbors

    box = periodic_box()
    module, _ = load(artifacts[dtype, kernel])
    expected = module.compute(*inputs_of(box), 0, 1, True)
    cell = torch.tensor(box.cell)
    edge_index, shifts = structure_neighbors(torch.tensor(box.positions), 6.0, cell, torch.tensor(box.pbc))
    receivers, senders = edge_index
    # Displacements in the artifact's dtype, as compute forms them (float32 forces are sensitive to their round-off)
    positions, cell = torch.tensor(box.positions).to(getattr(torch, dtype)), cell.to(getattr(torch, dtype))
    vectors = positions[senders] - positions[receivers] + shifts.to(cell.dtype) @ cell
    atom_energies, g = module.edge_energy_gradients(vectors, torch.tensor(box.numbers), receivers, senders, 0, 1)
    n = len(box.numbers)
    forces = torch.zeros(n, 3, dtype=g.dtype).index_add(0, receivers, g).index_add(0, senders, -g)
    tol = TOLERANCE[dtype]
    assert atom_energies.dtype == g.dtype == expected["forces"].dtype and not atom_energies.requires_grad
    assert_close(atom_energies, expected["atom_energies"], tol, "atom energies")
    assert_close(atom_energies.sum() + module.energy_offset(0, 1), expected["energy"], tol, "energy")
    assert_close(forces, expected["forces"], tol, "forces")
    assert_close(-(g.t() @ vectors.to(g.dtype)), expected["virial"], tol, "virial")


@pytest.mark.parametrize("dtype,kernel", KINDS)
def test_every_method_handles_zero_atoms(artifacts, dtype, kernel):
    """Issue 14 (2): an MPI rank may own no atom (a slab's vacuum, a molecule in a large box) and still takes part in
    the halo exchange, and a structure may be empty. Every method then returns empty results of the right shapes
    (no reshape error), through both kernels; an empty structure has energy 0."""
    module, metadata = load(artifacts[dtype, kernel])
    float_type = getattr(torch, dtype)
    layers, width, heads = metadata["num_layers"], metadata["model_config"]["d_model"], metadata["model_config"]["num_heads"]
    none3, none = torch.zeros(0, 3, dtype=float_type), torch.zeros(0, dtype=torch.long)
    for cell, pbc in ((torch.zeros(3, 3), [False] * 3), (torch.eye(3) * 10.0, [True] * 3)):
        out = module.compute(none3, none, cell.to(float_type), torch.tensor(pbc), 1, 2, True)
        assert float(out["energy"]) == 0.0 and out["energy"].shape == ()
        assert out["forces"].shape == (0, 3) and out["atom_energies"].shape == (0,)
        assert torch.equal(out["virial"], torch.zeros(3, 3, dtype=float_type))
    energies, g = module.edge_energy_gradients(none3, none, none, none, 0, 1)
    assert energies.shape == (0,) and g.shape == (0, 3)
    # The halo methods on a rank without atoms, as pair_style transip calls them, with the gradient back to the
    # (empty) edge vectors.
    vectors = none3.clone().requires_grad_(True)
    h0, bias, env, values, repulsion = module.halo_tokens(vectors, torch.tensor([8, 1]), none, none, 0, 0, 1)
    assert h0.shape == (0, width) and bias.shape == (layers, 0, heads) and env.shape == (0,)
    assert values.shape == (0, 3 + metadata["model_config"]["num_rbf"]) and repulsion.shape == (0,)
    h = module.halo_block(0, torch.cat([h0, torch.zeros(2, width, dtype=float_type)]), bias[0], env, values, none,
                          none, 0)
    assert h.shape == (0, width)
    energies = module.halo_energies(h, none)
    assert energies.shape == (0,)
    (g,) = torch.autograd.grad([h0, bias, env], [vectors], [torch.zeros_like(h0), torch.zeros_like(bias),
                                                            torch.zeros_like(env)])
    assert g.shape == (0, 3)


def test_energy_offset_checks_its_range(artifacts):
    """Issue 14 (2): energy_offset indexes its tables by charge + max_abs_charge and spin - 1; a value outside the
    range must be refused with its value named, not wrap around to another entry."""
    module, metadata = load(artifacts["float64", "fused"])
    model = model_from_checkpoint(artifacts["checkpoint"])
    top, spins = metadata["charge_spin"]["max_abs_charge"], metadata["charge_spin"]["max_multiplicity"]
    for charge, spin in ((-top, 1), (top, spins), (0, 1)):
        expected = model.charge_reference[charge + top] + model.spin_reference[spin - 1]
        assert float(module.energy_offset(charge, spin)) == float(expected)
    for charge, spin, message in ((-top - 1, 1, f"total charge {-top - 1} is outside the model's range -{top}\\.\\.{top}"),
                                  (top + 1, 1, f"total charge {top + 1} is outside the model's range -{top}\\.\\.{top}"),
                                  (0, 0, f"spin multiplicity 0 is outside the model's range 1\\.\\.{spins}"),
                                  (0, spins + 1, f"spin multiplicity {spins + 1} is outside the model's range")):
        with pytest.raises(torch.jit.Error, match="energy_offset: " + message):
            module.energy_offset(charge, spin)


def test_metadata_says_what_an_engine_needs(artifacts, tmp_path):
    fused, reference = read_metadata(artifacts["float64", "fused"]), read_metadata(artifacts["float32", "reference"])
    assert fused["format"] == "transip-artifact" and fused["format_version"] == FORMAT_VERSION == 4
    assert fused["methods"] == METHODS == ["compute", "edge_energy_gradients", "energy_offset", "halo_tokens",
                                           "halo_block", "halo_energies"]
    module, _ = load(artifacts["float64", "fused"])
    assert all(hasattr(module, method) for method in METHODS) and not hasattr(module, "compute_with_neighbors")
    # every metadata path the engines read (export/contract.py, C++ through its generated header) is there
    for name in dir(contract):
        if name.startswith("KEY_"):
            assert contract.metadata_path(fused, getattr(contract, name)) is not None, name
    assert contract.metadata_path(fused, contract.KEY_NATIVE_OPS_VERSION) == native.version()
    assert contract.metadata_path(reference, contract.KEY_NATIVE_OPS_VERSION) is None
    assert fused["elements"] == SHIPPED["elements"].split()
    assert fused["cutoff"] == SHIPPED["cutoff"] and fused["receptive_field"] == SHIPPED["cutoff"] * (1 + fused["num_layers"])
    assert fused["units"]["energy"] == "eV" and fused["units"]["length"] == "angstrom"
    assert fused["native_ops"]["version"] == native.version() and "transip::neighbor_attention" in fused["native_ops"]["ops"]
    assert reference["native_ops"] is None and reference["dtype"] == "float32"
    assert fused["provenance"]["objective"] == "transip" and fused["provenance"]["dataset_sha256"]
    assert fused["model_config"]["repulsion"] == "zbl" and fused["model_config"]["repulsion_range"] == 1.0
    assert fused["model_config"]["block_geometry"] is True
    # the test metrics written beside a checkpoint travel with it
    shipped = export_checkpoint(SHIPPED_MODEL, tmp_path / "shipped.pt")
    card = json.loads((SHIPPED_MODEL.parent / "test_metrics.json").read_text())
    assert shipped["metrics"]["test"]["test_frames"]["force_mae"] == card["test_frames"]["force_mae"]
    assert shipped["model_config"]["repulsion"] == SHIPPED["repulsion"]
    assert shipped["model_config"]["block_geometry"] is SHIPPED["block_geometry"]
    assert fused["created"].endswith("+00:00")


def test_reference_artifact_runs_without_the_native_library(artifacts, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        module = torch.jit.load({str(artifacts['float64', 'reference'])!r})
        out = module.compute(torch.zeros(2, 3, dtype=torch.float64) + torch.tensor([[0., 0, 0], [0.96, 0, 0]]),
                             torch.tensor([8, 1]), torch.zeros(3, 3, dtype=torch.float64),
                             torch.zeros(3, dtype=torch.bool), 0, 2, False)
        assert "transip" not in torch.ops.loaded_libraries.__repr__()
        print(float(out["energy"]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.isfinite(float(run.stdout.split()[-1]))


# ------------------------------------------------------------------------------------------ errors
def rewrite_metadata(source: Path, target: Path, **changes):
    metadata = read_metadata(source)
    metadata.update(changes)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith("/extra/transip_metadata.json"):
                data = json.dumps(metadata).encode()
            new.writestr(item, data)


def test_load_errors_name_the_problem(artifacts, tmp_path):
    good = artifacts["float64", "fused"]
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "missing.pt")
    text = tmp_path / "model.pt"
    text.write_text("not a model\n")
    with pytest.raises(ArtifactError, match="not a TorchScript file .*transip export"):
        load(text)
    with pytest.raises(ArtifactError, match="training checkpoint .*transip export"):
        load(SHIPPED_MODEL)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load(truncated)
    newer = tmp_path / "newer.pt"
    rewrite_metadata(good, newer, format_version=99)
    with pytest.raises(ArtifactError, match=f"format version 99; this transip reads version {FORMAT_VERSION}: upgrade"):
        load(newer)
    other_ops = tmp_path / "other-ops.pt"
    rewrite_metadata(good, other_ops, native_ops={**read_metadata(good)["native_ops"], "version": "9.9.9"})
    with pytest.raises(ArtifactError, match="exported with TransIP native ops 9.9.9, but this process has version"):
        load(other_ops)
    no_metadata = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(no_metadata))
    with pytest.raises(ArtifactError, match="without TransIP metadata"):
        load(no_metadata)


def test_artifact_of_the_old_format_is_refused(artifacts, tmp_path):
    """Format version 1 had `compute_with_neighbors` and no method named for each engine path: Python and C++
    readers refuse it and say to export it again."""
    old = tmp_path / "old.pt"
    rewrite_metadata(artifacts["float64", "fused"], old, format_version=1)
    message = f"format version 1, older than the version {FORMAT_VERSION} .*export it again with `transip export"
    with pytest.raises(ArtifactError, match=message):
        load(old)
    xyz = ROOT / "examples" / "molecules" / "aspirin.xyz"
    run = subprocess.run([str(bench_binary()), str(old), str(xyz)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and re.search("transip-bench: error: .*old\\.pt has artifact " + message, run.stderr), \
        run.stderr


def test_corrupt_content_is_reported(artifacts, tmp_path):
    good = artifacts["float64", "reference"]
    corrupt = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(good) as old, zipfile.ZipFile(corrupt, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if "/code/" in item.filename and item.filename.endswith(".py"):
                data = b"this is not TorchScript code (\n"
            new.writestr(item, data)
    with pytest.raises(ArtifactError, match="could not be loaded .*corrupt"):
        load(corrupt)


def test_missing_ops_device_and_dtype_errors(artifacts, monkeypatch):
    metadata = read_metadata(artifacts["float64", "fused"])
    with pytest.raises(ArtifactError, match="fused kernel, which runs on the CPU only"):
        check_device("m.pt", {**metadata}, torch.device("meta"))  # any non-CPU device
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="CUDA is not available here"):
            load(artifacts["float64", "reference"], device="cuda")
    with pytest.raises(ArtifactError, match="float64, which device mps does not support"):
        check_device("m.pt", {**metadata, "kernel": "reference"}, torch.device("mps"))
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_load_error", "No module named 'transip._C'")
    with pytest.raises(ArtifactError, match="needs the TransIP native ops library .* not loaded.*--kernel reference"):
        check_native_ops("m.pt", metadata)


def test_export_and_inspect_commands(tmp_path):
    out = tmp_path / "model.pt"
    run = subprocess.run([sys.executable, "-m", "transip", "export", str(SHIPPED_MODEL), "-o", str(out),
                          "--dtype", "float32", "--kernel", "reference"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    shown = subprocess.run([sys.executable, "-m", "transip", "inspect", str(out)], capture_output=True, text=True)
    assert f"elements          {SHIPPED['elements']}\n" in shown.stdout
    assert "dtype / kernel    float32 / reference" in shown.stdout and "native ops        none" in shown.stdout
    if SHIPPED["repulsion"] == "zbl":
        assert "repulsion         zbl, switched off at" in shown.stdout
    else:
        assert "repulsion         none" in shown.stdout
    geometry = "edge features in every block" if SHIPPED["block_geometry"] else "none"
    assert f"block geometry    {geometry}" in shown.stdout
    as_json = json.loads(subprocess.run([sys.executable, "-m", "transip", "inspect", str(out), "--json"],
                                        capture_output=True, text=True).stdout)
    assert as_json["receptive_field"] == SHIPPED["cutoff"] * (1 + as_json["num_layers"])
    bad = subprocess.run([sys.executable, "-m", "transip", "inspect", str(tmp_path / "nope.pt")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.pt does not exist" in bad.stderr
    assert not list(tmp_path.glob("*.partial"))


# ------------------------------------------------------------------------------------------ C++ program
def bench_binary() -> Path:
    return Path(native.library_path()).parent / "transip-bench"


@pytest.mark.parametrize("dtype,kernel", [("float64", "fused"), ("float32", "reference")])
def test_cpp_program_gives_the_python_numbers(artifacts, tmp_path, dtype, kernel):
    structure = periodic_box()
    xyz = tmp_path / "box.extxyz"
    write_extxyz_exact(structure, xyz)
    result = tmp_path / "result.json"
    run = subprocess.run([str(bench_binary()), str(artifacts[dtype, kernel]), str(xyz), "--warmup", "1",
                          "--repeat", "2", "--json", str(result)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "time per evaluation" in run.stderr and "atom-evaluations per second" in run.stderr
    got = json.loads(result.read_text())
    expected = python_reference(artifacts["checkpoint"], structure, dtype, kernel)
    assert got["atoms"] == len(structure.numbers) and got["dtype"] == dtype and got["seconds_median"] > 0
    assert_close(got["energy"], expected["energy"], TOLERANCE[dtype], "energy")
    assert_close(torch.tensor(got["forces"], dtype=torch.float64).view(-1, 3), expected["forces"], TOLERANCE[dtype], "forces")


def test_cpp_program_knows_elements_beyond_xenon_and_shows_the_model_message(artifacts, tmp_path):
    """Issue 14 (3, 7): transip-bench's element table is Python's (it once stopped at Xe and refused Bi as an
    unknown symbol), and a failing model call shows the model's own message, not the interpreter's header."""
    xyz = tmp_path / "bismuth.xyz"
    xyz.write_text("2\n\nH 0 0 0\nBi 2.5 0 0\n")
    run = subprocess.run([str(bench_binary()), str(artifacts["float64", "fused"]), str(xyz), "--warmup", "0",
                          "--repeat", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "transip-bench: error: ValueError: element with atomic number 83 is not known to this model" in run.stderr


def test_one_element_table_for_every_language(tmp_path):
    """Issue 14 (7): the C++ element table is generated at build time from transip/elements.py, the table Python
    uses, and no C++ source carries a typed copy."""
    from transip.model import ELEMENT_SYMBOLS

    header = tmp_path / "element_symbols.h"
    run = subprocess.run([sys.executable, str(ROOT / "cpp" / "generate_element_symbols.py"),
                          str(ROOT / "transip" / "elements.py"), str(header)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = header.read_text().split("kElementSymbols[] = {")[1].split("};")[0]
    assert re.findall(r'"(\w+)"', table) == list(ELEMENT_SYMBOLS) and len(ELEMENT_SYMBOLS) == 119
    sources = [p for folder in ("cpp", "lammps", "openmm_plugin") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".h", ".hpp", ".cpp", ".cc")]
    assert sources and not [p for p in sources if '"Xe"' in p.read_text()]


def test_one_artifact_contract_for_every_language(tmp_path):
    """Issue 15: the format version, metadata file and key paths and unit factors C++ uses are generated at build
    time from export/contract.py, the module the exporter writes with, and no C++ source retypes them."""
    header = tmp_path / "contract.h"
    run = subprocess.run([sys.executable, str(ROOT / "cpp" / "generate_contract.py"),
                          str(ROOT / "export" / "contract.py"), str(header)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = header.read_text()
    assert f"inline constexpr int kFormatVersion = {contract.FORMAT_VERSION};" in text
    assert 'inline constexpr const char* kKeyNativeOpsVersion = "native_ops.version";' in text
    assert f"inline constexpr double kKcalPerMolPerEv = {contract.KCAL_PER_MOL_PER_EV!r};" in text
    sources = [p for folder in ("cpp", "lammps") for p in (ROOT / folder).rglob("*") if p.suffix in (".h", ".cpp")]
    retyped = [p for p in sources for literal in (contract.METADATA_FILE, "23.06", '"format_version"', '"version"')
               if literal in p.read_text()]
    assert sources and not retyped, retyped


def test_cpp_program_errors(artifacts, tmp_path):
    xyz = ROOT / "examples" / "molecules" / "aspirin.xyz"
    missing = subprocess.run([str(bench_binary()), str(tmp_path / "none.pt"), str(xyz)], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "cannot load artifact" in missing.stderr
    bad_xyz = tmp_path / "bad.xyz"
    bad_xyz.write_text("2\n\nQq 0 0 0\nH 1 0 0\n")
    unknown = subprocess.run([str(bench_binary()), str(artifacts["float64", "fused"]), str(bad_xyz)],
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown element symbol 'Qq'" in unknown.stderr
    usage = subprocess.run([str(bench_binary())], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: transip-bench" in usage.stderr


def test_inspect_shows_repulsion_and_block_geometry(artifacts):
    from transip.export import describe

    text = describe(read_metadata(artifacts["float64", "fused"]))
    assert "repulsion         zbl, switched off at 1.0 x the sum of covalent radii" in text
    assert "block geometry    edge features in every block" in text

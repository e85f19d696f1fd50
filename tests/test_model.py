"""Physical properties of the model: conservative forces, stress, smoothness at the cutoff, invariances."""

import numpy as np
import pytest
import torch

from transip.data import Structure, collate, evaluate_batch
from transip.metrics import predict
from transip.model import ModelConfig, TransIP
from transip.neighbors import structure_neighbors

CUTOFF = 3.0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TransIP(ModelConfig(elements=[1, 6, 8], cutoff=CUTOFF, d_model=32, num_heads=4, num_layers=2)).double()
    # Non-trivial reference and scale so that every term of the energy is exercised.
    with torch.no_grad():
        m.reference_energy.copy_(torch.tensor([-13.6, -1030.0, -2040.0]))
        m.energy_scale.fill_(2.0)
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def molecule(seed=1, n=7):
    rng = np.random.default_rng(seed)
    return Structure(rng.choice([1, 6, 8], n), rng.uniform(0, 2.5, (n, 3)), charge=1, spin=2, name="m")


def crystal(seed=2):
    rng = np.random.default_rng(seed)
    cell = np.array([[3.2, 0.0, 0.0], [0.7, 3.5, 0.0], [-0.4, 0.5, 3.8]])  # triclinic
    frac = rng.uniform(0, 1, (5, 3))
    return Structure([6, 8, 1, 1, 6], frac @ cell, cell=cell, pbc=[True, True, True], name="c")


def energy(model, s):
    return float(predict(model, [s])["energy"][0])


@pytest.mark.parametrize("make", [molecule, crystal])
def test_forces_are_minus_finite_difference_gradient(model, make):
    s = make()
    forces = predict(model, [s])["forces"][0]
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(s.numbers)):
        for a in range(3):
            plus, minus = s.positions.copy(), s.positions.copy()
            plus[i, a] += h
            minus[i, a] -= h
            numeric[i, a] = -(energy(model, Structure(s.numbers, plus, s.charge, s.spin, s.cell, s.pbc))
                              - energy(model, Structure(s.numbers, minus, s.charge, s.spin, s.cell, s.pbc))) / (2 * h)
    assert np.abs(forces).max() > 1e-3  # a meaningful comparison
    np.testing.assert_allclose(forces, numeric, rtol=1e-6, atol=1e-6 * np.abs(forces).max())


def test_stress_matches_strain_derivative(model):
    s = crystal()
    virial = predict(model, [s], compute_virial=True)["virial"][0]
    h = 1e-6
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * h
                # x -> (I + eps) x for positions and lattice vectors (rows: x @ (I + eps)^T)
                energies.append(energy(model, Structure(s.numbers, s.positions @ strain.T, cell=s.cell @ strain.T,
                                                        pbc=s.pbc)))
            numeric[a, b] = (energies[0] - energies[1]) / (2 * h)  # dE/d eps_ab
    # virial = -dE/d eps
    np.testing.assert_allclose(virial, -numeric, rtol=1e-6, atol=1e-6 * np.abs(virial).max())


def test_virials_of_a_batch_are_each_structures_own(model):
    """One structure's virial is a matrix product, several structures' a sum over each one's edges: a batch of
    two strained crystals gives each the virial it has alone."""
    first = crystal()
    strain = np.eye(3) + 0.02 * np.array([[1.0, 0.3, 0.0], [0.0, -0.5, 0.2], [0.1, 0.0, 0.4]])
    second = Structure(first.numbers, first.positions @ strain.T, cell=first.cell @ strain.T, pbc=first.pbc)
    together = predict(model, [first, second], compute_virial=True)["virial"]
    alone = [predict(model, [s], compute_virial=True)["virial"][0] for s in (first, second)]
    assert np.abs(alone[0] - alone[1]).max() > 1e-4  # two different virials, so a mix-up would show
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-10, atol=1e-12)


def assert_smooth(energies: np.ndarray, forces: np.ndarray) -> None:
    """A scan with a step of 1e-4 A is smooth. Along a smooth curve the third differences are (third derivative)
    x step^3 (energies: ~1e-9 here). A jump J in the energy, the force or the curvature would show up in the
    energy's as J, J x step or J x step^2. The forces' third differences carry the jump of the energy's third
    derivative that the quintic envelope and switch allow (~2e-6); a jump in a force would show up as itself."""
    assert np.abs(np.diff(energies, 3)).max() < 1e-8
    assert np.abs(np.diff(forces, 3, axis=0)).max() < 1e-5


def test_energy_and_forces_continuous_through_cutoff(model):
    """Scan one atom's distance from another through r_c: energy and forces change smoothly."""
    base = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [-0.4, 1.0, 0.0]])
    distances = np.linspace(CUTOFF - 0.02, CUTOFF + 0.02, 401)
    energies, forces = [], []
    for d in distances:
        pos = np.vstack([base, [[d, 0.1, 0.0]]])
        out = predict(model, [Structure([6, 8, 1, 1], pos)])
        energies.append(out["energy"][0])
        forces.append(out["forces"][0])
    energies, forces = np.array(energies), np.array(forces)
    # The scan really crosses the cutoff: the pair (0, 3) is in the neighbour list at the start only.
    first = collate([Structure([6, 8, 1, 1], np.vstack([base, [[distances[0], 0.1, 0.0]]]))], CUTOFF)
    last = collate([Structure([6, 8, 1, 1], np.vstack([base, [[distances[-1], 0.1, 0.0]]]))], CUTOFF)
    assert first.edge_index.shape[1] == last.edge_index.shape[1] + 2
    assert_smooth(energies, forces)
    assert np.abs(np.diff(energies)).max() > 1e-6  # the energy does depend on this distance


def test_translation_invariance_exact(model):
    s = molecule()
    shifted = Structure(s.numbers, s.positions + np.array([13.7, -4.2, 101.3]), s.charge, s.spin)
    a, b = predict(model, [s]), predict(model, [shifted])
    assert abs(a["energy"][0] - b["energy"][0]) < 1e-10 * abs(a["energy"][0])
    np.testing.assert_allclose(a["forces"][0], b["forces"][0], atol=1e-9)


def test_permutation_equivariance(model):
    s = molecule(n=9)
    perm = np.random.default_rng(5).permutation(9)
    p = Structure(s.numbers[perm], s.positions[perm], s.charge, s.spin)
    a, b = predict(model, [s]), predict(model, [p])
    assert abs(a["energy"][0] - b["energy"][0]) < 1e-10 * abs(a["energy"][0])
    np.testing.assert_allclose(a["forces"][0][perm], b["forces"][0], atol=1e-10)


def test_periodic_image_shift_gives_same_energy(model):
    s = crystal()
    moved = s.positions.copy()
    moved[0] += s.cell[1] - 2 * s.cell[2]  # atom 0 to another image
    a = predict(model, [s])
    b = predict(model, [Structure(s.numbers, moved, cell=s.cell, pbc=s.pbc)])
    assert abs(a["energy"][0] - b["energy"][0]) < 1e-9 * abs(a["energy"][0])
    np.testing.assert_allclose(a["forces"][0], b["forces"][0], atol=1e-9)


def test_small_box_counts_multiple_images(model):
    """A box shorter than the cutoff: each atom sees several images of itself; the list is still exact."""
    cell = np.diag([1.3, 1.4, 5.0])
    s = Structure([6, 1], [[0.1, 0.2, 0.3], [0.6, 0.9, 1.1]], cell=cell, pbc=[True, True, False])
    edges, shifts = structure_neighbors(torch.tensor(s.positions), CUTOFF, torch.tensor(cell),
                                        torch.tensor(s.pbc))
    vec = (torch.tensor(s.positions)[edges[1]] - torch.tensor(s.positions)[edges[0]]
           + shifts.double() @ torch.tensor(cell))
    # brute force over a generous image range
    expected = 0
    for i in range(2):
        for j in range(2):
            for n1 in range(-5, 6):
                for n2 in range(-5, 6):
                    d = s.positions[j] - s.positions[i] + n1 * cell[0] + n2 * cell[1]
                    if (i != j or n1 or n2) and np.linalg.norm(d) < CUTOFF:
                        expected += 1
    assert edges.shape[1] == expected
    assert float(vec.norm(dim=1).max()) < CUTOFF
    assert np.isfinite(predict(model, [s])["energy"]).all()


def test_batch_equals_individual_structures(model):
    a, b = molecule(1), crystal()
    together = predict(model, [a, b])
    for k, s in enumerate([a, b]):
        alone = predict(model, [s])
        assert abs(together["energy"][k] - alone["energy"][0]) < 1e-10 * abs(alone["energy"][0])
        np.testing.assert_allclose(together["forces"][k], alone["forces"][0], atol=1e-10)


def test_model_is_not_built_rotation_invariant(model):
    """The architecture must not hard-wire rotational symmetry: an untrained model sees a rotation."""
    from transip.metrics import equivariance_error

    assert equivariance_error(model, [molecule()], num_rotations=2)["energy_abs"] > 1e-6


def test_charge_and_spin_change_the_energy(model):
    s = molecule()
    other = Structure(s.numbers, s.positions, charge=0, spin=1)
    assert abs(energy(model, s) - energy(model, other)) > 1e-6


def test_scripted_model_matches_eager(model):
    s = molecule()
    batch = collate([s], CUTOFF)
    scripted = torch.jit.script(model)
    a = evaluate_batch(model, batch)
    b = evaluate_batch(scripted, batch)
    torch.testing.assert_close(a["energy"], b["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(a["forces"], b["forces"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- short-range repulsion (docs/model.md)
def pair_scan(model, zi: int, zj: int, distances) -> tuple:
    """Energy and the force on the second atom along the axis (positive = pushed apart) of an isolated pair,
    neutral, lowest multiplicity its electron count allows."""
    spin = 1 if (zi + zj) % 2 == 0 else 2
    out = predict(model, [Structure([zi, zj], np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]), spin=spin)
                          for r in distances])
    return np.array(out["energy"]), np.array([f[1, 0] for f in out["forces"]])


def test_energy_rises_steeply_as_atoms_approach(engine_checkpoint):
    """Every element pair of the model, scanned from 1.5 A down to 0.3 A in empty space: the force pushes the
    atoms apart at every distance below 0.6 A, and C-H at 0.3 A lies at least 50 eV above the scan's minimum
    (GFN2-xTB: +111 eV; the model without repulsion: +3.7 eV, with a force pulling H into C)."""
    from transip.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(engine_checkpoint).set_kernel("reference")
    distances = np.round(np.arange(1.5, 0.2999, -0.01), 3)
    short = distances <= 0.6
    elements = model.config.elements
    for a, zi in enumerate(elements):
        for zj in elements[a:]:
            energies, forces = pair_scan(model, zi, zj, distances)
            assert (forces[short] > 0).all(), (zi, zj, distances[short][forces[short] <= 0])
            assert (np.diff(energies[distances <= 0.61]) > 0).all(), (zi, zj)
    energies, _ = pair_scan(model, 6, 1, distances)
    assert energies[-1] - energies.min() >= 50.0


def zbl_by_hand(zi: int, zj: int, r: float) -> float:
    """The ZBL universal screened Coulomb energy, written out from Ziegler, Biersack and Littmark (1985)."""
    a = 0.46850 / (zi ** 0.23 + zj ** 0.23)
    x = r / a
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x) + 0.28022 * np.exp(-0.40290 * x)
           + 0.02817 * np.exp(-0.20162 * x))
    return 14.399645 * zi * zj / r * phi


def test_repulsion_is_zbl_switched_off_at_the_covalent_range(model):
    """The repulsion term alone: ZBL times the smooth step of r / (covalent radius sum), zero beyond, and
    each directed edge gives half to its receiver, so the pair's total is counted once."""
    from ase.data import covalent_radii

    for zi, zj, r in ((6, 1, 0.3), (8, 8, 0.9), (1, 1, 0.5), (6, 8, 1.3), (6, 8, 1.6)):
        vectors = torch.tensor([[r, 0.0, 0.0], [-r, 0.0, 0.0]], dtype=torch.float64)
        species = model.species(torch.tensor([zi, zj]))
        energies = model.repulsion_energies(vectors, torch.tensor([0, 1]), torch.tensor([1, 0]), species, 2)
        x = r / (covalent_radii[zi] + covalent_radii[zj])
        step = 1 - 10 * x ** 3 + 15 * x ** 4 - 6 * x ** 5 if x < 1 else 0.0
        expected = zbl_by_hand(zi, zj, r) * step
        assert torch.allclose(energies, torch.tensor([expected / 2] * 2, dtype=torch.float64), rtol=1e-12, atol=0)
    assert 1.3 < covalent_radii[6] + covalent_radii[8] < 1.6  # C-O: once inside, once beyond the switch


def test_energy_and_forces_continuous_through_the_repulsion_switch(model):
    """Scan an O-H distance through the repulsion's switch-off distance: energy and forces change smoothly."""
    from ase.data import covalent_radii

    switch_off = covalent_radii[8] + covalent_radii[1]
    distances = np.linspace(switch_off - 0.02, switch_off + 0.02, 401)
    out = predict(model, [Structure([8, 1], np.array([[0.0, 0.0, 0.0], [d, 0.05, 0.0]]), spin=2)
                          for d in distances])
    energies, forces = np.array(out["energy"]), np.array([f[1] for f in out["forces"]])
    assert_smooth(energies, forces)
    species = model.species(torch.tensor([8, 1]))
    edge = lambda d: torch.tensor([[d, 0.0, 0.0]], dtype=torch.float64)  # noqa: E731
    inside = model.repulsion_energies(edge(switch_off - 0.02), torch.tensor([0]), torch.tensor([1]), species, 2)
    beyond = model.repulsion_energies(edge(switch_off + 1e-9), torch.tensor([0]), torch.tensor([1]), species, 2)
    assert float(inside[0]) > 0 and float(beyond[0]) == 0.0  # the scan really crosses the switch


def test_repulsion_settings_are_checked_and_old_checkpoints_keep_none():
    with pytest.raises(ValueError, match="repulsion must be one of \\('zbl', 'none'\\), got 'lj'"):
        ModelConfig(elements=[1, 6], repulsion="lj")
    with pytest.raises(ValueError, match="repulsion_range=5.0 switches the repulsion off at 7.60 A \\(C-C\\), "
                                         "which must lie within the cutoff 6.0 A"):
        ModelConfig(elements=[1, 6], repulsion_range=5.0)
    from conftest import ROOT
    from transip.checkpoint import model_from_checkpoint

    assert ModelConfig(elements=[1]).repulsion == "zbl"  # new models have it
    first_model = ROOT / "models" / "transip-xtb-small" / "best.ckpt"
    assert model_from_checkpoint(first_model).config.repulsion == "none"  # trained before it existed

"""Screened nuclear repulsion (Ziegler-Biersack-Littmark "universal" potential) for the model's short range.

When two nuclei are pushed together, the energy rises as their screened Coulomb repulsion, far more steeply than
a network trained near equilibrium extrapolates. Adding that term to the energy makes every model repulsive at
short range whatever it learned (the network then learns the difference to the reference method):

    E_ij(r) = k Z_i Z_j / r * phi(r / a_ij) * S(r / r_off,ij)
    phi(x)  = 0.18175 e^(-3.19980 x) + 0.50986 e^(-0.94229 x) + 0.28022 e^(-0.40290 x) + 0.02817 e^(-0.20162 x)
    a_ij    = 0.46850 A / (Z_i^0.23 + Z_j^0.23)
    k       = e^2 / (4 pi eps0) = 14.399645 eV A

S is the model's smooth step (1 - 10x^3 + 15x^4 - 6x^5, zero from x = 1 with zero slope and curvature), and the
switch-off distance r_off,ij = range x (covalent radius i + covalent radius j) (ASE's table, Cordero et al.
2008), so the term fades out between bonded neighbours' distances rather than at the model's cutoff.
Parameters: J. F. Ziegler, J. P. Biersack, U. Littmark, The Stopping and Range of Ions in Solids (1985).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

REPULSIONS = ("zbl", "none")
COULOMB_CONSTANT = 14.399645  # e^2 / (4 pi eps0) in eV A
SCREENING_LENGTH = 0.46850  # A
SCREENING_EXPONENT = 0.23
ZBL_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)


def repulsion_tables(elements: Sequence[int], switch_range: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per species pair (species index = position in `elements`): k Z_i Z_j (eV A), 1 / a_ij (1/A), and the
    switch-off distance r_off,ij (A)."""
    from ase.data import covalent_radii

    z = torch.tensor([float(e) for e in elements], dtype=torch.float64)
    radius = torch.tensor([float(covalent_radii[int(e)]) for e in elements], dtype=torch.float64)
    charge_product = COULOMB_CONSTANT * z[:, None] * z[None, :]
    screening = z ** SCREENING_EXPONENT
    inverse_screening = (screening[:, None] + screening[None, :]) / SCREENING_LENGTH
    switch_off = switch_range * (radius[:, None] + radius[None, :])
    return charge_product, inverse_screening, switch_off


def zbl_screening_function() -> Tuple[torch.Tensor, torch.Tensor]:
    """phi's coefficients and exponents as tensors (4,) each (the model keeps them as buffers: TorchScript
    cannot read module-level tuples)."""
    return (torch.tensor(ZBL_COEFFICIENTS, dtype=torch.float64), torch.tensor(ZBL_EXPONENTS, dtype=torch.float64))


def zbl_pair_energy(lengths: torch.Tensor, charge_product: torch.Tensor, inverse_screening: torch.Tensor,
                    coefficients: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """k Z_i Z_j / r * phi(r / a_ij) per pair (unswitched), in eV."""
    x = (lengths * inverse_screening)[:, None]
    phi = (coefficients * torch.exp(-exponents * x)).sum(1)
    return charge_product / lengths * phi


def zbl_switched_derivatives(lengths: torch.Tensor, charge_product: torch.Tensor, inverse_screening: torch.Tensor,
                             switch_off: torch.Tensor, coefficients: torch.Tensor,
                             exponents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half the switched pair energy, E = g(r) S(r / r_off) / 2 with g = k Z_i Z_j phi(r / a) / r, and its first
    two derivatives with respect to r (for transip.analytic.radial; the value equals zbl_pair_energy x switch / 2)."""
    from .analytic import smooth_step_down_derivatives

    a = inverse_screening[:, None]
    terms = coefficients * torch.exp(-exponents * lengths[:, None] * a)  # (E, 4)
    phi = terms.sum(1)
    phi_1 = -(exponents * terms).sum(1) * inverse_screening  # d phi / dr
    phi_2 = (exponents * exponents * terms).sum(1) * inverse_screening ** 2
    inverse = 1.0 / lengths
    g = charge_product * phi * inverse
    g_1 = charge_product * (phi_1 - phi * inverse) * inverse
    g_2 = charge_product * (phi_2 - 2.0 * phi_1 * inverse + 2.0 * phi * inverse * inverse) * inverse
    s, s_1, s_2 = smooth_step_down_derivatives(lengths / switch_off, switch_off)
    return 0.5 * g * s, 0.5 * (g_1 * s + g * s_1), 0.5 * (g_2 * s + 2.0 * g_1 * s_1 + g * s_2)

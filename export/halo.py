"""The artifact's halo-exchange methods: the model in pieces, for engines that split atoms over domains (LAMMPS on
several ranks) and exchange each block's tokens between them instead of carrying ghosts out to the receptive field.
Ghosts then need to reach only one cutoff.

Edges have local receivers only, grouped by receiver in atom order; senders are local atoms or ghosts, and every
atom array holds the local atoms first, then the ghosts. The recipe, with autograd (`halo_energy_gradients` below
runs it in Python for one domain whose ghosts are images of its own atoms; lammps/src/pair_transip.cpp runs it
across MPI ranks, `PairTransIP::evaluate_by_blocks`):

1. `h0, bias, env, values, rep = halo_tokens(r, ...)` with `r.requires_grad_()`. Make `bias`, `env` and `values`
   (the edge features every block reads) leaves (`detach`, `requires_grad_`). `rep` is the local atoms' share of
   the short-range repulsion (one cutoff: no exchange).
2. For each block l: the local input is a new leaf `h.detach()`. The ghost input is a new leaf filled with the
   ghosts' owners' local inputs (forward communication). Then `h = halo_block(l, cat(local, ghost), bias[l], env,
   values, ...)`.
3. Per-atom energies are `halo_energies(leaf(h), ...) + rep`; the gradient of `halo_energies(...).sum()` with
   respect to that leaf seeds the backward.
4. For l from the last block down: differentiate block l's output with respect to its local leaf, ghost leaf,
   `bias`, `env` and `values` (with the current gradient). Sum the ghost gradient onto the owners (reverse communication)
   and add it to the local gradient. That sum is the gradient for block l - 1's output.
5. One last gradient through `halo_tokens` (outputs `h0`, `bias`, `env`, `values` with their accumulated
   gradients, `rep` with ones; leave out `values` and `rep` where they need no gradient: a model without block
   geometry or repulsion) gives
   `g = dE/dr`: forces and virial follow as from `edge_energy_gradients` (transip.kernels.reference_edge_forces,
   transip.model.edge_virial).

The structure's charge/spin offset (`energy_offset`) is added once, by one domain.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from transip.model import csr_row_ptr

HALO_METHODS = ["halo_tokens", "halo_block", "halo_energies"]


class HaloExchange(nn.Module):
    """The halo methods of `TransIPArtifact` (a base class, so that they are methods of the artifact itself).
    Expects `self.model`, a TransIP."""

    @torch.jit.export
    def halo_tokens(self, edge_vectors: torch.Tensor, numbers: torch.Tensor, receivers: torch.Tensor,
                    senders: torch.Tensor, num_local: int, charge: int = 0,
                    spin: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial tokens of the local atoms (num_local, d), attention biases of every block (layers, E, heads),
        envelope (E,), the edge values every block reads (E, F; F = 0 without block geometry) and the local
        atoms' repulsion energies (num_local,). `numbers` covers local atoms then ghosts; `edge_vectors` =
        x_sender - x_receiver."""
        species = self.model.species(numbers)
        h0, bias, env, values = self.model.initial_tokens(edge_vectors, receivers, senders, species,
                                                          torch.tensor([charge]), torch.tensor([spin]),
                                                          torch.zeros(num_local, dtype=torch.long), num_local)
        return h0, bias, env, values, self.model.repulsion_energies(edge_vectors, receivers, senders, species, num_local)

    @torch.jit.export
    def halo_block(self, layer: int, tokens: torch.Tensor, bias: torch.Tensor, envelope: torch.Tensor,
                   values: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, num_local: int) -> torch.Tensor:
        """Block `layer` on tokens of local atoms then ghosts (N, d); returns the local atoms' new tokens."""
        row_ptr = csr_row_ptr(receivers, tokens.shape[0])
        return self.model.apply_block(layer, tokens, bias, envelope, values, receivers, senders, row_ptr, num_local)

    @torch.jit.export
    def halo_energies(self, tokens: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Per-atom energies of the local atoms from the last block's tokens."""
        return self.model.atom_energies(tokens, self.model.species(numbers))[0]


def halo_energy_gradients(module, edge_vectors: torch.Tensor, numbers: torch.Tensor, receivers: torch.Tensor,
                          senders: torch.Tensor, owner: torch.Tensor, num_layers: int, charge: int = 0,
                          spin: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recipe above on one domain: per-atom energies of the local atoms (no offset) and g = dE/dr, as
    `edge_energy_gradients` gives them. `module` is a loaded artifact; `owner` (N,) is the local atom each of the
    N atoms is (or is an image of): communication is then copying tokens from owners and summing gradients onto
    them."""
    num_local = int((owner == torch.arange(owner.shape[0])).sum())
    ghost_owner = owner[num_local:]
    vectors = edge_vectors.detach().requires_grad_(True)
    h0, bias, env, values, repulsion = module.halo_tokens(vectors, numbers, receivers, senders, num_local, charge,
                                                          spin)
    bias_leaf, env_leaf = bias.detach().requires_grad_(True), env.detach().requires_grad_(True)
    values_leaf = values.detach().requires_grad_(True)
    local_in: List[torch.Tensor] = []
    ghost_in: List[torch.Tensor] = []
    out: List[torch.Tensor] = []
    h = h0
    for layer in range(num_layers):
        local_in.append(h.detach().requires_grad_(True))
        ghost_in.append(local_in[-1].detach()[ghost_owner].requires_grad_(True))  # forward communication
        h = module.halo_block(layer, torch.cat([local_in[-1], ghost_in[-1]]), bias_leaf[layer], env_leaf,
                              values_leaf, receivers, senders, num_local)
        out.append(h)
    last = h.detach().requires_grad_(True)
    atom_energies = module.halo_energies(last, numbers[:num_local])
    (grad,) = torch.autograd.grad(atom_energies.sum(), [last])
    grad_bias, grad_env, grad_values = torch.zeros_like(bias), torch.zeros_like(env), torch.zeros_like(values)
    for layer in reversed(range(num_layers)):
        g_local, g_ghost, g_bias, g_env, g_values = torch.autograd.grad(
            out[layer], [local_in[layer], ghost_in[layer], bias_leaf, env_leaf, values_leaf], grad, allow_unused=True)
        grad = _or_zeros(g_local, local_in[layer]).index_add(0, ghost_owner, _or_zeros(g_ghost, ghost_in[layer]))
        grad_bias = grad_bias + _or_zeros(g_bias, bias)
        grad_env = grad_env + _or_zeros(g_env, env)
        grad_values = grad_values + _or_zeros(g_values, values)
    outputs, seeds = [h0, bias, env], [grad, grad_bias, grad_env]
    for output, seed in ((values, grad_values), (repulsion, torch.ones_like(repulsion))):
        if output.requires_grad:  # not for a model without block geometry or repulsion
            outputs, seeds = outputs + [output], seeds + [seed]
    (g,) = torch.autograd.grad(outputs, [vectors], seeds, allow_unused=True)
    return (atom_energies + repulsion).detach(), _or_zeros(g, vectors)


def _or_zeros(gradient, like: torch.Tensor) -> torch.Tensor:
    """A gradient autograd left undefined (nothing depended on the input: no edges, no ghosts) as zeros."""
    return torch.zeros_like(like) if gradient is None else gradient

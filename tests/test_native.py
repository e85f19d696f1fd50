"""Native ops (cpp/): fused neighbour attention and the cell-list neighbour list against the references."""

import os
import subprocess
import sys
import textwrap

import ase.io
import numpy as np
import pytest
import torch

import transip
from transip import native
from transip.attention import neighbor_attention_reference
from transip.checkpoint import model_from_checkpoint
from transip.data import Structure, collate, evaluate_batch, structure_from_atoms
from transip.neighbors import structure_neighbors

from conftest import ROOT, SHIPPED_MODEL

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native ops not built: {native.load_error()}")

attention = torch.ops.transip.neighbor_attention if native.available() else None


def random_graph(num_atoms, num_edges, heads=4, head_dim=16, dtype=torch.float64, seed=0, empty_rows=(),
                 zero_envelope_rows=()):
    """Random q, k, v, bias, envelope and edges grouped by receiver; some rows empty, some fully enveloped out."""
    g = torch.Generator().manual_seed(seed)
    receivers = torch.randint(0, num_atoms, (num_edges,), generator=g)
    keep = ~torch.isin(receivers, torch.tensor(list(empty_rows), dtype=torch.long))
    receivers = torch.sort(receivers[keep]).values
    senders = torch.randint(0, num_atoms, (receivers.numel(),), generator=g)
    q, k, v = (torch.randn(num_atoms, heads, head_dim, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(receivers.numel(), heads, generator=g, dtype=dtype)
    envelope = torch.rand(receivers.numel(), generator=g, dtype=dtype)
    envelope[torch.isin(receivers, torch.tensor(list(zero_envelope_rows), dtype=torch.long))] = 0.0
    row_ptr = torch.zeros(num_atoms + 1, dtype=torch.long)
    row_ptr[1:] = torch.cumsum(torch.bincount(receivers, minlength=num_atoms), 0)
    return dict(q=q, k=k, v=v, bias=bias, envelope=envelope, row_ptr=row_ptr, senders=senders, receivers=receivers)


def fused_and_reference(graph, with_self=False, value_width=0):
    """Output and the gradients of every floating input, through the op and through the reference function.
    with_self: the op's implicit self edges (self_bias, self_values, envelope 1) against explicit ones in the
    reference. value_width: F edge values appended to the values (0: none)."""
    dtype, heads = graph["q"].dtype, graph["q"].shape[1]
    g = torch.Generator().manual_seed(7)
    if with_self and "self_bias" not in graph:
        graph["self_bias"] = torch.randn(heads, generator=g, dtype=dtype)
    if value_width:
        graph["edge_values"] = torch.randn(graph["senders"].numel(), value_width, generator=g, dtype=dtype)
        graph["self_values"] = torch.randn(value_width, generator=g, dtype=dtype)
    names = (["q", "k", "v", "bias", "envelope"] + (["self_bias"] if with_self else [])
             + (["edge_values"] if value_width else []) + (["self_values"] if value_width and with_self else []))
    inputs = {name: graph[name].clone().requires_grad_(True) for name in names}
    fused = attention(*(inputs[name] for name in ("q", "k", "v", "bias", "envelope")), graph["row_ptr"],
                      graph["senders"], inputs.get("self_bias"), inputs.get("edge_values"), inputs.get("self_values"))
    ref = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.items()}
    bias, envelope, values = ref["bias"], ref["envelope"], ref.get("edge_values")
    receivers, senders = graph["receivers"], graph["senders"]
    if with_self:
        n = ref["q"].shape[0]
        atoms = torch.arange(n)
        bias = torch.cat([ref["self_bias"].expand(n, -1), bias])
        envelope = torch.cat([torch.ones(n, dtype=envelope.dtype), envelope])
        receivers, senders = torch.cat([atoms, receivers]), torch.cat([atoms, senders])
        if values is not None:
            values = torch.cat([ref["self_values"].expand(n, -1), values])
    reference = neighbor_attention_reference(ref["q"], ref["k"], ref["v"], bias, envelope, receivers, senders, values)
    grad_out = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, list(inputs.values()), grad_out)
    reference_grads = torch.autograd.grad(reference, list(ref.values()), grad_out)
    return (fused, *fused_grads), (reference, *reference_grads)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("head_dim", [16, 12, 5])
@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("value_width", [0, 19])
def test_fused_attention_matches_reference(dtype, rtol, head_dim, with_self, value_width):
    graph = random_graph(60, 900, head_dim=head_dim, dtype=dtype, empty_rows=(3, 17), zero_envelope_rows=(5,))
    fused, reference = fused_and_reference(graph, with_self, value_width)
    assert fused[0].shape == (60, 4, head_dim + value_width)
    assert len(fused) == 6 + with_self + (value_width > 0) * (1 + with_self)  # output and every input's gradient
    for index, (a, b) in enumerate(zip(fused, reference)):
        scale = float(b.detach().abs().max())
        assert float((a - b).detach().abs().max()) <= rtol * scale, index
    if not with_self:  # empty and enveloped-out rows give zeros
        out = fused_and_reference(graph, value_width=value_width)[0][0]
        assert float(out[3].detach().abs().max()) == 0.0 and float(out[5].detach().abs().max()) == 0.0


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("heads", [10, 17])
def test_fused_attention_with_many_heads(dtype, rtol, heads):
    """Rows of heads x head_dim go through whole vectors spanning heads while the heads fit a vector's lanes (16
    float, 8 double) and per head beyond: 10 heads take each route in one precision, 17 the per-head one in both."""
    graph = random_graph(30, 300, heads=heads, head_dim=3, dtype=dtype, empty_rows=(4,))
    fused, reference = fused_and_reference(graph, with_self=True, value_width=5)
    for index, (a, b) in enumerate(zip(fused, reference)):
        assert float((a - b).detach().abs().max()) <= rtol * float(b.detach().abs().max()), index


def test_fused_attention_gradcheck():
    # No fully enveloped-out row here: at Z = 0 the output jumps (0 -> v_j) as an envelope leaves 0, so finite
    # differences are meaningless there; those rows are checked against the reference above.
    graph = random_graph(7, 30, heads=2, head_dim=3, empty_rows=(2,))
    graph["envelope"] = graph["envelope"] * 0.8 + 0.1
    inputs = tuple(graph[name].clone().requires_grad_(True) for name in ("q", "k", "v", "bias", "envelope"))
    assert torch.autograd.gradcheck(lambda *x: attention(*x, graph["row_ptr"], graph["senders"]), inputs,
                                    eps=1e-6, atol=1e-8)
    self_bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: attention(*x[:5], graph["row_ptr"], graph["senders"], x[5]),
                                    inputs + (self_bias,), eps=1e-6, atol=1e-8)
    edge_values = torch.randn(graph["senders"].numel(), 3, dtype=torch.float64, requires_grad=True)
    self_values = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *x: attention(*x[:5], graph["row_ptr"], graph["senders"], x[5], x[6], x[7]),
        inputs + (self_bias, edge_values, self_values), eps=1e-6, atol=1e-8)


def test_fused_attention_without_edges():
    graph = random_graph(4, 0)
    out = attention(graph["q"], graph["k"], graph["v"], graph["bias"], graph["envelope"], graph["row_ptr"],
                    graph["senders"])
    assert out.shape == (4, 4, 16) and float(out.abs().max()) == 0.0


def test_portable_kernel_build_gives_the_same_numbers():
    """TRANSIP_ISA=generic runs the build for any x86-64; it must agree with the AVX-512 one to round-off."""
    script = textwrap.dedent("""
        import torch, transip, sys
        sys.path.insert(0, %r)
        from test_native import random_graph, fused_and_reference
        print(torch.ops.transip.isa())
        graph = random_graph(50, 700, head_dim=16)
        for a, b in zip(*fused_and_reference(graph, with_self=True)):
            assert float((a - b).detach().abs().max()) <= 1e-10 * float(b.detach().abs().max())
        print("ok")
    """ % str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRANSIP_ISA": "generic"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["generic", "ok"]


def attention_inputs(graph, with_self: bool, value_width: int, seed: int = 3):
    """The floating inputs of one attention call (leaves), and a function of them that calls the op."""
    g = torch.Generator().manual_seed(seed)
    dtype, heads = graph["q"].dtype, graph["q"].shape[1]
    leaves = [graph[n].clone().requires_grad_(True) for n in ("q", "k", "v", "bias", "envelope")]
    self_bias = torch.randn(heads, generator=g, dtype=dtype).requires_grad_(True) if with_self else None
    values = (torch.randn(graph["senders"].numel(), value_width, generator=g, dtype=dtype).requires_grad_(True)
              if value_width else None)
    self_values = (torch.randn(value_width, generator=g, dtype=dtype).requires_grad_(True)
                   if value_width and with_self else None)
    optional = [t for t in (self_bias, values, self_values) if t is not None]

    def call(*x):
        rest = list(x[5:])
        picked = [rest.pop(0) if t is not None else None for t in (self_bias, values, self_values)]
        return attention(*x[:5], graph["row_ptr"], graph["senders"], *picked)

    return tuple(leaves + optional), call


@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("value_width", [0, 4])
def test_fused_attention_double_backward_gradgradcheck(with_self, value_width):
    """Training with a force loss differentiates the backward: the fused op's double backward against finite
    differences of its backward, for every input and the incoming gradient."""
    graph = random_graph(9, 40, heads=2, head_dim=3, empty_rows=(2,))
    graph["envelope"] = graph["envelope"] * 0.8 + 0.1  # no row with Z = 0: finite differences jump there
    inputs, call = attention_inputs(graph, with_self, value_width)
    assert torch.autograd.gradgradcheck(call, inputs, eps=1e-6, atol=1e-7)


def reference_call(graph, with_self: bool, value_width: int):
    """The reference function with the op's argument list (implicit self edges made explicit)."""
    receivers, senders = graph["receivers"], graph["senders"]

    def call(*x):
        q, k, v, bias, envelope = x[:5]
        rest = list(x[5:])
        self_bias = rest.pop(0) if with_self else None
        values = rest.pop(0) if value_width else None
        self_values = rest.pop(0) if value_width and with_self else None
        r, s = receivers, senders
        if with_self:
            n = q.shape[0]
            atoms = torch.arange(n)
            bias = torch.cat([self_bias.expand(n, -1), bias])
            envelope = torch.cat([torch.ones(n, dtype=envelope.dtype), envelope])
            r, s = torch.cat([atoms, receivers]), torch.cat([atoms, senders])
            if values is not None:
                values = torch.cat([self_values.expand(n, -1), values])
        return neighbor_attention_reference(q, k, v, bias, envelope, r, s, values)

    return call


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("value_width", [0, 19])
def test_fused_attention_double_backward_matches_reference(dtype, rtol, with_self, value_width):
    """The second derivative a force loss takes, through the op and through the reference function, on a graph
    with empty rows and a fully enveloped-out row (Z = 0)."""
    graph = random_graph(50, 700, head_dim=16, dtype=dtype, empty_rows=(3, 17), zero_envelope_rows=(5,))
    inputs, fused_call = attention_inputs(graph, with_self, value_width)
    reference_inputs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    g = torch.Generator().manual_seed(11)
    results = []
    for call, leaves in ((fused_call, inputs), (reference_call(graph, with_self, value_width), reference_inputs)):
        out = call(*leaves)
        grad_out = torch.randn(out.shape, generator=g, dtype=dtype).requires_grad_(True)
        first = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
        g2 = torch.Generator().manual_seed(12)
        cotangents = [torch.randn(f.shape, generator=g2, dtype=dtype) for f in first]
        loss = sum((f * c).sum() for f, c in zip(first, cotangents))
        results.append(torch.autograd.grad(loss, list(leaves) + [grad_out]))
        g = torch.Generator().manual_seed(11)
    for index, (a, b) in enumerate(zip(*results)):
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= rtol * scale, index


def test_third_derivative_through_fused_kernel_is_refused():
    graph = random_graph(10, 40)
    q = graph["q"].clone().requires_grad_(True)
    out = attention(q, graph["k"], graph["v"], graph["bias"], graph["envelope"], graph["row_ptr"], graph["senders"])
    (first,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (second,) = torch.autograd.grad((first ** 2).sum(), q, retain_graph=True)  # a force loss's gradient: fine
    assert torch.isfinite(second).all()
    with pytest.raises(RuntimeError, match="differentiable twice.*reference kernel"):
        torch.autograd.grad((first ** 2).sum(), q, create_graph=True)  # would lead to a third derivative


@pytest.mark.parametrize("change,message", [
    (dict(row_ptr=torch.tensor([0, 2, 1, 3])), "row_ptr must be non-decreasing"),
    (dict(row_ptr=torch.tensor([0, 1, 2])), "row_ptr must be int64 of length atoms \\+ 1 = 4"),
    (dict(senders=torch.tensor([0, 1, 7])), "senders must lie in \\[0, 3\\)"),
    (dict(bias=torch.zeros(3, 2, dtype=torch.float64)), "bias must have shape \\(edges, heads\\) = \\(3, 4\\)"),
    (dict(k=torch.zeros(3, 4, 7, dtype=torch.float64)), "must have the same shape"),
    (dict(envelope=torch.zeros(3, dtype=torch.float32)), "must share q's dtype"),
    (dict(edge_values=torch.zeros(2, 5, dtype=torch.float64)),
     "edge_values must be a CPU tensor of shape \\(edges, F\\) with edges = 3"),
    (dict(edge_values=torch.zeros(3, 5, dtype=torch.float64), self_bias=torch.zeros(4, dtype=torch.float64)),
     "give self_values exactly when self_bias is given"),
    (dict(edge_values=torch.zeros(3, 5, dtype=torch.float64), self_bias=torch.zeros(4, dtype=torch.float64),
          self_values=torch.zeros(4, dtype=torch.float64)), "self_values must be a CPU tensor of shape \\(F,\\) = \\(5\\)"),
    (dict(self_values=torch.zeros(5, dtype=torch.float64)), "self_values needs edge_values"),
])
def test_fused_attention_rejects_bad_input(change, message):
    args = dict(q=torch.zeros(3, 4, 8, dtype=torch.float64), k=torch.zeros(3, 4, 8, dtype=torch.float64),
                v=torch.zeros(3, 4, 8, dtype=torch.float64), bias=torch.zeros(3, 4, dtype=torch.float64),
                envelope=torch.ones(3, dtype=torch.float64), row_ptr=torch.tensor([0, 1, 2, 3]),
                senders=torch.tensor([0, 1, 2]))
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        attention(**args)


def test_fused_attention_backward_checks_the_forward_state_it_is_given():
    """The backward reads the forward's exp(s - m) per edge and head (one row per edge, plus one per atom with
    self edges) instead of recomputing the scores: a state of another shape is refused with its name and the
    shape it must have, and the state the forward wrote gives the autograd op's gradients."""
    graph = random_graph(20, 150, head_dim=12)
    self_bias = torch.randn(4, dtype=torch.float64)
    inputs = [graph[n] for n in ("q", "k", "v", "bias", "envelope", "row_ptr", "senders")]
    out, row_exp, row_sum = torch.ops.transip.neighbor_attention_forward(*inputs, self_bias, None, None)
    assert row_exp.shape == (150 + 20, 4) and row_sum.shape == (20, 4)
    grad_out = torch.randn_like(out)
    grads = torch.ops.transip.neighbor_attention_backward(grad_out, *inputs, self_bias, None, None, out, row_exp,
                                                          row_sum)
    leaves = [x.clone().requires_grad_(True) for x in inputs[:5]]
    auto = torch.autograd.grad(attention(*leaves, graph["row_ptr"], graph["senders"], self_bias), leaves, grad_out)
    for mine, theirs in zip(grads[:5], auto):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"row_exp must have shape \(edges \+ self edges, heads\) = \(170, 4\)"):
        torch.ops.transip.neighbor_attention_backward(grad_out, *inputs, self_bias, None, None, out, row_exp[:150],
                                                      row_sum)


# ------------------------------------------------------------------------------------------ neighbour list
def edge_set(edge_index, shifts):
    return set(zip(edge_index[0].tolist(), edge_index[1].tolist(), map(tuple, shifts.tolist())))


def random_box(g, n):
    cell = torch.randn(3, 3, generator=g, dtype=torch.float64) * 2 + torch.eye(3, dtype=torch.float64) * (
        2 + 12 * float(torch.rand(1, generator=g)))
    positions = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 1.6 - 0.3) @ cell  # some atoms outside
    return positions, cell


@pytest.mark.parametrize("seed", range(6))
def test_native_neighbor_list_equals_brute_force_in_triclinic_boxes(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        n = int(torch.randint(1, 50, (1,), generator=g))
        positions, cell = random_box(g, n)
        pbc = torch.rand(3, generator=g) < 0.75
        cutoff = 1.0 + 5.0 * float(torch.rand(1, generator=g))  # often longer than the box is thick
        native_edges = structure_neighbors(positions, cutoff, cell, pbc, kernel="fused")
        reference_edges = structure_neighbors(positions, cutoff, cell, pbc, kernel="reference")
        assert edge_set(*native_edges) == edge_set(*reference_edges)
        # The same order too: grouped by receiver (CSR), then by sender and shift within a row, so that sums
        # over a row run in the same order through both kernels.
        assert torch.equal(native_edges[0], reference_edges[0]) and torch.equal(native_edges[1], reference_edges[1])


def test_native_neighbor_list_equals_brute_force_for_molecules():
    for name in ("aspirin", "caffeine"):
        positions = torch.tensor(ase.io.read(ROOT / "examples" / "molecules" / f"{name}.xyz").positions)
        for cutoff in (1.2, 3.0, 6.0, 50.0):
            assert edge_set(*structure_neighbors(positions, cutoff, kernel="fused")) == edge_set(
                *structure_neighbors(positions, cutoff, kernel="reference"))
    # a sparse gas: two far-apart clusters must not allocate a grid spanning the gap
    g = torch.Generator().manual_seed(0)
    gas = torch.cat([torch.randn(20, 3, generator=g, dtype=torch.float64),
                     torch.randn(20, 3, generator=g, dtype=torch.float64) + 1e7])
    assert edge_set(*structure_neighbors(gas, 2.0, kernel="fused")) == edge_set(
        *structure_neighbors(gas, 2.0, kernel="reference"))


def test_native_neighbor_list_edge_cases():
    nl = torch.ops.transip.neighbor_list
    edges, shifts = nl(torch.zeros(0, 3, dtype=torch.float64), None, None, 5.0)
    assert edges.shape == (2, 0) and shifts.shape == (0, 3)
    edges, _ = nl(torch.zeros(1, 3, dtype=torch.float64), None, None, 5.0)
    assert edges.shape == (2, 0)  # an isolated atom has no neighbours
    with pytest.raises(RuntimeError, match="cell vectors are degenerate"):
        nl(torch.zeros(2, 3), torch.zeros(3, 3), None, 5.0)
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        nl(torch.full((2, 3), float("nan")), None, None, 5.0)
    with pytest.raises(RuntimeError, match="pbc is set but no cell"):
        nl(torch.zeros(2, 3), None, torch.tensor([True, False, False]), 5.0)
    with pytest.raises(RuntimeError, match="positions must have shape \\(N, 3\\)"):
        nl(torch.zeros(2, 2), None, None, 5.0)
    with pytest.raises(RuntimeError, match="cutoff must be positive"):
        nl(torch.zeros(2, 3), None, None, -1.0)
    with pytest.raises(RuntimeError, match="far thinner than the cutoff"):
        nl(torch.zeros(2, 3), torch.eye(3) * 0.01, None, 6.0)


# ------------------------------------------------------------------------------------------ edge geometry
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_geometry_ops_equal_the_reference_bit_for_bit(dtype):
    from transip.kernels import FusedEdgeGeometry, reference_edge_forces, reference_edge_vectors
    g = torch.Generator().manual_seed(3)
    n, e = 40, 700
    positions = torch.randn(n, 3, generator=g, dtype=dtype) * 5
    receivers, senders = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
    shifts = torch.randn(e, 3, generator=g, dtype=dtype)
    grads = torch.randn(e, 3, generator=g, dtype=dtype)
    for r in (receivers, receivers.sort().values):  # any edge order; an atom's sums run in edge order
        assert torch.equal(torch.ops.transip.edge_vectors(positions, r, senders, shifts),
                           reference_edge_vectors(positions, r, senders, shifts))
        assert torch.equal(torch.ops.transip.edge_forces(grads, r, senders, n),
                           reference_edge_forces(grads, r, senders, n))
    # Inputs that carry gradients go through the reference functions, so forces stay differentiable.
    grads.requires_grad_(True)
    forces = FusedEdgeGeometry().forces(grads, receivers, senders, n)
    assert forces.requires_grad
    forces.sum().backward()
    assert grads.grad is not None


def test_edge_geometry_ops_reject_bad_input():
    positions, shifts = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    atoms = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"senders\[1\] = 4 is outside \[0, 4\)"):
        torch.ops.transip.edge_vectors(positions, atoms, torch.tensor([0, 4]), shifts)
    with pytest.raises(RuntimeError, match=r"receivers\[0\] = -1 is outside \[0, 3\)"):
        torch.ops.transip.edge_forces(shifts, torch.tensor([-1, 0]), atoms, 3)
    with pytest.raises(RuntimeError, match=r"shift_vectors must have shape \(edges, 3\) = \(2, 3\)"):
        torch.ops.transip.edge_vectors(positions, atoms, atoms, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must share one floating type"):
        torch.ops.transip.edge_vectors(positions, atoms, atoms, shifts.float())
    with pytest.raises(RuntimeError, match="receivers and senders must be int64"):
        torch.ops.transip.edge_forces(shifts, atoms.int(), atoms, 4)


# ------------------------------------------------------------------------------------------ whole model
def shipped_structures():
    aspirin = structure_from_atoms(ase.io.read(ROOT / "examples" / "molecules" / "aspirin.xyz"),
                                   require_labels=False)
    # A periodic triclinic box of the same chemistry: two aspirin copies, closer than the cutoff across faces.
    cell = np.array([[11.0, 0.0, 0.0], [2.0, 10.5, 0.0], [-1.0, 1.5, 12.0]])
    positions = np.concatenate([aspirin.positions, aspirin.positions[:, ::-1] + 5.0])
    box = Structure(np.concatenate([aspirin.numbers, aspirin.numbers]), positions, cell=cell, pbc=[True] * 3)
    return [aspirin, box]


def test_model_identical_through_both_kernels():
    """float64: the two paths agree to 1e-10 relative. float32: both paths are compared with float64, and the
    fused path's round-off must be no worse than the reference path's (the virial is a sum with heavy
    cancellation, so a fixed float32 tolerance would test luck)."""
    results = {}
    for dtype in (torch.float64, torch.float32):
        model = model_from_checkpoint(SHIPPED_MODEL, dtype=dtype)
        for index, structure in enumerate(shipped_structures()):
            batch = collate([structure], model.cutoff, dtype=dtype)
            for kernel in ("fused", "reference"):
                out = evaluate_batch(model.set_kernel(kernel), batch, compute_virial=True)
                results[dtype, index, kernel] = {k: out[k].detach().double() for k in
                                                 ("energy", "atom_energy", "forces", "virial")}
    for index in range(2):
        exact = results[torch.float64, index, "reference"]
        for key, value in results[torch.float64, index, "fused"].items():
            scale = max(1.0, float(exact[key].abs().max()))
            assert float((value - exact[key]).abs().max()) <= 1e-10 * scale, key
        for key in exact:
            fused_error = float((results[torch.float32, index, "fused"][key] - exact[key]).abs().max())
            reference_error = float((results[torch.float32, index, "reference"][key] - exact[key]).abs().max())
            assert fused_error <= 2 * reference_error + 1e-6 * max(1.0, float(exact[key].abs().max())), key


def test_kernel_switch():
    model = model_from_checkpoint(SHIPPED_MODEL)
    assert model.kernel == "fused"  # the library is loaded, so auto means fused
    assert model.set_kernel("reference").kernel == "reference"
    with pytest.raises(ValueError, match="unknown attention kernel 'cuda'"):
        model.set_kernel("cuda")
    out = subprocess.run([sys.executable, "-c", "from transip.checkpoint import model_from_checkpoint as m; "
                          f"print(m({str(SHIPPED_MODEL)!r}).kernel)"],
                         env={**os.environ, "TRANSIP_KERNEL": "reference"}, capture_output=True, text=True)
    assert out.stdout.strip() == "reference", out.stderr


def test_fused_requested_without_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_load_error", "No module named 'transip._C'")
    with pytest.raises(RuntimeError, match="native ops library .* is not loaded: No module named"):
        native.resolve_kernel("fused")
    assert native.resolve_kernel("auto") == "reference"


def test_scripted_fused_model_loads_in_a_fresh_process(tmp_path):
    """Save a scripted model that calls the ops; reload it in a new process that only loads the library
    (as a C++ engine would, through torch.ops.load_library) and compare numbers."""
    model = model_from_checkpoint(SHIPPED_MODEL).set_kernel("fused")
    structure = shipped_structures()[1]
    batch = collate([structure], model.cutoff)
    expected = evaluate_batch(model, batch, compute_virial=True)
    path = tmp_path / "fused.pt"
    torch.jit.script(model).save(str(path))
    inputs = {name: getattr(batch, name) for name in ("positions", "numbers", "charge", "spin", "batch", "edge_index")}
    torch.save({**inputs, "shift_vectors": batch.shift_vectors()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({native.library_path()!r})
        model = torch.jit.load({str(path)!r})
        x = torch.load({str(tmp_path / 'inputs.pt')!r})
        out = model(x["positions"], x["numbers"], x["charge"], x["spin"], x["batch"], x["edge_index"],
                    x["shift_vectors"], 1, True, True)
        torch.save({{k: out[k] for k in ("energy", "forces", "atom_energy", "virial")}}, {str(tmp_path / 'out.pt')!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "transip" not in result.stderr
    reloaded = torch.load(tmp_path / "out.pt")
    for key in ("energy", "forces", "atom_energy", "virial"):
        torch.testing.assert_close(reloaded[key], expected[key], rtol=0, atol=1e-12)


def test_native_library_reports_itself():
    assert native.version() == transip.__version__
    assert native.isa() in ("avx512", "generic")
    assert os.path.isfile(native.library_path())
    # keep_freed_memory changes the process's allocator: check it in a process of its own.
    run = subprocess.run([sys.executable, "-c", "import transip; print(transip.native.keep_freed_memory())"],
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "True", run.stderr


# ------------------------------------------------------------------------------------------ edge encoder
def edge_inputs(num_atoms=40, num_edges=400, hidden=32, num_rbf=16, num_species=3, num_bias=8, dtype=torch.float64,
                seed=0):
    """Random edges (some beyond the cutoff, one of zero length) and parameters for the edge encoders."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(num_edges, 3, generator=g, dtype=dtype) * 3.0
    vectors[0] = 0.0
    receivers = torch.randint(0, num_atoms, (num_edges,), generator=g)
    senders = torch.randint(0, num_atoms, (num_edges,), generator=g)
    species = torch.randint(0, num_species, (num_atoms,), generator=g)
    w = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype) / shape[-1] ** 0.5  # noqa: E731
    params = (torch.linspace(0.0, 6.0, num_rbf, dtype=dtype), 6.0 / num_rbf, 6.0, w(hidden, 3 + num_rbf), w(hidden),
              w(hidden, hidden), w(hidden), w(num_bias, hidden), w(num_bias), 2, w(64, hidden), w(64),
              w(num_species, 64))  # 2 bias groups (layers) of num_bias / 2 heads
    return vectors, receivers, senders, species, num_atoms, params


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hidden", [32, 24])  # 32 has a compile-time specialisation, 24 takes the generic loop
def test_fused_edge_encoder_matches_reference(dtype, rtol, hidden):
    from transip.kernels import EdgeWeights, FusedEdgeEncoder, ReferenceEdgeEncoder

    vectors, receivers, senders, species, n, params = edge_inputs(hidden=hidden, dtype=dtype)
    a = vectors.clone().requires_grad_(True)
    b = vectors.clone().requires_grad_(True)
    fused = FusedEdgeEncoder()(a, receivers, senders, species, n, EdgeWeights(*params), True)
    reference = ReferenceEdgeEncoder()(b, receivers, senders, species, n, EdgeWeights(*params), True)
    weights = [torch.randn_like(x) for x in reference]
    (ga,) = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, fused)), a)
    (gb,) = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, reference)), b)
    assert fused[3].shape == (vectors.shape[0], 3 + params[0].numel())
    for name, x, y in zip(("bias", "messages", "envelope", "features"), fused, reference):
        assert float((x - y).detach().abs().max()) <= rtol * float(y.detach().abs().max()), name
    assert float((ga - gb).abs().max()) <= rtol * float(gb.abs().max())
    assert torch.isfinite(ga[0]).all()  # the zero-length edge


def test_fused_edge_encoder_gradcheck_and_refusals():
    vectors, receivers, senders, species, n, params = edge_inputs(num_atoms=5, num_edges=14, hidden=8, num_rbf=4)
    vectors = vectors[1:] * 0.5  # finite differences need |r| > 0 and no edge exactly at the cutoff
    slot = receivers[1:] * 3 + species[senders[1:]]
    centers, width, cutoff, w1, b1, w2, b2, wb, bb = params[:9]
    op = torch.ops.transip.edge_encoder
    for features in (False, True):  # with the edge features as a fifth output, whose gradient the backward takes
        assert torch.autograd.gradcheck(
            lambda v: op(v, slot, n * 3, centers, width, cutoff, w1, b1, w2, b2, wb, bb, 1, features),
            (vectors.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="grad_features must have shape \\(13, 7\\), got \\[13, 5\\]"):
        torch.ops.transip.edge_encoder_backward(
            *op(vectors, slot, n * 3, centers, width, cutoff, w1, b1, w2, b2, wb, bb)[:4], vectors, slot, centers,
            width, cutoff, w1, b1, w2, b2, wb, bb, 1, torch.zeros(13, 5, dtype=vectors.dtype))
    w1 = w1.clone().requires_grad_(True)
    out = op(vectors, slot, n * 3, centers, width, cutoff, w1, b1, w2, b2, wb, bb)
    with pytest.raises(RuntimeError, match="edge vectors only.*reference kernel"):
        torch.autograd.grad(out[0].sum(), w1)
    with pytest.raises(RuntimeError, match="w1 must have shape \\(8, 7\\)"):
        op(vectors, slot, n * 3, centers, width, cutoff, w1[:, :5], b1, w2, b2, wb, bb)
    with pytest.raises(RuntimeError, match="index 99 at position 0 is outside \\[0, 15\\)"):
        op(vectors, torch.cat([torch.tensor([99]), slot[1:]]), n * 3, centers, width, cutoff, w1, b1, w2, b2, wb, bb)


def test_forces_through_fused_model_with_trainable_parameters():
    """Parameters that require grad (an un-frozen model) do not stop force evaluation: only the gradient with
    respect to geometry is asked for, so the edge encoder's parameter-gradient refusal must not trigger."""
    model = model_from_checkpoint(SHIPPED_MODEL).set_kernel("fused")
    assert all(p.requires_grad for p in model.parameters())
    batch = collate(shipped_structures()[:1], model.cutoff)
    assert torch.isfinite(evaluate_batch(model, batch)["forces"]).all()


def test_isolated_atoms_through_both_kernels():
    """Atoms without neighbours (a lone atom; two atoms farther apart than the cutoff) attend only to
    themselves: same energies through both paths, zero forces."""
    model = model_from_checkpoint(SHIPPED_MODEL)
    for structure in (Structure([8], [[0.0, 0.0, 0.0]], spin=3),
                      Structure([8, 1], [[0.0, 0.0, 0.0], [0.0, 0.0, 7.5]], spin=2)):
        batch = collate([structure], model.cutoff)
        assert batch.edge_index.shape[1] == 0
        fused = evaluate_batch(model.set_kernel("fused"), batch)
        reference = evaluate_batch(model.set_kernel("reference"), batch)
        assert abs(float(fused["energy"][0] - reference["energy"][0])) < 1e-10 * abs(float(reference["energy"][0]))
        assert float(fused["forces"].abs().max()) == 0.0

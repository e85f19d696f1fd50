"""Hand-derived derivatives for training against plain autograd: the radial functions of transip/analytic.py
and the fused training edge encoder (native ops): values, first and second derivatives, and refusals."""

import math

import pytest
import torch

from transip import analytic, native
from transip.kernels import EdgeWeights, ReferenceEdgeEncoder, TrainingEdgeEncoder, envelope
from transip.repulsion import repulsion_tables, zbl_pair_energy, zbl_screening_function


def random_vectors(edges=40, seed=1, cutoff=4.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(edges, 3, generator=g, dtype=torch.float64), dim=1)
    return direction * (0.3 + (cutoff + 0.5) * torch.rand(edges, 1, generator=g, dtype=torch.float64))


def second_derivatives(fn, vectors):
    """A scalar built from fn's output and its gradient (as a force loss is), and that scalar's gradient."""
    r = vectors.clone().requires_grad_(True)
    out = fn(r)
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view_as(out)
    (first,) = torch.autograd.grad((weights * out).sum(), r, create_graph=True)
    loss = (out * weights).sum() + (first * first).sum()
    (second,) = torch.autograd.grad(loss, r)
    return out.detach(), first.detach(), second


@pytest.mark.parametrize("name", ["lengths", "repulsion"])
def test_radial_functions_equal_autograd_to_second_order(name):
    elements = [1, 6, 8]
    charge_product, inverse_screening, switch_off = (t[1, 2].expand(40) for t in repulsion_tables(elements, 1.0))
    coefficients, exponents = zbl_screening_function()
    length = lambda r: torch.linalg.norm(r, dim=1)
    plain, hand = {
        "lengths": (length, analytic.lengths),
        "repulsion": (
            lambda r: 0.5 * zbl_pair_energy(length(r), charge_product, inverse_screening, coefficients, exponents)
            * envelope(length(r) / switch_off, 1.0),
            lambda r: analytic.radial(length(r), *analytic_zbl(length(r), charge_product, inverse_screening,
                                                              switch_off, coefficients, exponents))),
    }[name]
    vectors = random_vectors()
    for x, y in zip(second_derivatives(hand, vectors), second_derivatives(plain, vectors)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_lengths_of_a_zero_vector_have_zero_derivatives():
    """torch.linalg.norm gives a zero gradient at r = 0 but a NaN second derivative; the hand-written one gives
    zeros for both."""
    vectors = random_vectors(edges=4)
    vectors[2] = 0.0
    value, first, second = second_derivatives(analytic.lengths, vectors)
    assert float(value[2]) == 0.0 and torch.equal(first[2], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(second[2], torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(second_derivatives(lambda r: torch.linalg.norm(r, dim=1), vectors)[2][2]).all()


def analytic_zbl(*args):
    from transip.repulsion import zbl_switched_derivatives

    return zbl_switched_derivatives(*args)


def encoder_inputs(hidden=16, num_rbf=6, species=3, atoms=7, edges=30, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    receivers = torch.sort(torch.randint(0, atoms, (edges,), generator=g)).values
    senders = torch.randint(0, atoms, (edges,), generator=g)
    weights = EdgeWeights(torch.linspace(0.0, 4.0, num_rbf, dtype=dtype), 0.7, 4.0, w(hidden, 3 + num_rbf), w(hidden),
                          w(hidden, hidden), w(hidden), w(2 * 4, hidden), w(2 * 4), 2, w(12, hidden), w(12),
                          w(species, 12))
    return random_vectors(edges, seed).to(dtype), receivers, senders, \
        torch.randint(0, species, (atoms,), generator=g), atoms, weights


def encoder_second_order(encoder, vectors, receivers, senders, species, atoms, weights, features=True):
    """Outputs, the geometry gradient (forces) and the gradient of a force-loss-like scalar with respect to the
    geometry and every weight: what training differentiates. With `features` the edge features (the blocks' edge
    values) are an output too, so their gradient takes part in both derivatives."""
    params = [p.clone().requires_grad_(i >= 3) if isinstance(p, torch.Tensor) else p  # not the rbf centres
              for i, p in enumerate(weights)]
    leaves = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
    r = vectors.clone().requires_grad_(True)
    outputs = encoder(r, receivers, senders, species, atoms, EdgeWeights(*params), features)
    assert outputs[3].shape == (vectors.shape[0], 3 + weights.centers.numel() if features else 0)
    energy = sum((torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o) * o).sum() for o in outputs)
    (forces,) = torch.autograd.grad(energy, r, create_graph=True)
    loss = energy + (forces ** 2).sum()
    return [o.detach() for o in outputs] + [forces.detach()] + list(torch.autograd.grad(loss, [r] + leaves))


@pytest.mark.skipif(not native.available(), reason="native ops not built")
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("hidden,edges,features", [(16, 30, True), (24, 30, True), (16, 0, True), (16, 30, False)])
def test_training_edge_encoder_equals_reference_to_second_order(dtype, rtol, hidden, edges, features):
    """The native training ops (forward, backward with weight gradients, double backward) against autograd
    through the reference encoder; hidden 16 is a compiled width, 24 any width."""
    inputs = encoder_inputs(hidden=hidden, edges=edges, dtype=dtype)
    fused = encoder_second_order(TrainingEdgeEncoder(), *inputs, features=features)
    reference = encoder_second_order(ReferenceEdgeEncoder(), *inputs, features=features)
    for x, y in zip(fused, reference):
        scale = max(float(y.abs().max()), 1.0) if y.numel() else 1.0
        assert float((x - y).abs().max()) <= rtol * scale if x.numel() else x.shape == y.shape


@pytest.mark.skipif(not native.available(), reason="native ops not built")
def test_training_edge_encoder_refuses_to_differentiate_weight_gradients():
    vectors, receivers, senders, species, atoms, weights = encoder_inputs()
    w1 = weights.w1.clone().requires_grad_(True)
    r = vectors.clone().requires_grad_(True)
    bias, messages, env, _ = TrainingEdgeEncoder()(r, receivers, senders, species, atoms, weights._replace(w1=w1))
    (grad_w1,) = torch.autograd.grad(bias.sum() + messages.sum(), w1, create_graph=True)
    with pytest.raises(RuntimeError, match="does not differentiate its weights' gradients again"):
        torch.autograd.grad(grad_w1.sum(), r)


def test_third_derivative_is_refused():
    r = random_vectors(edges=5).requires_grad_(True)
    (first,) = torch.autograd.grad(analytic.lengths(r).sum(), r, create_graph=True)
    (second,) = torch.autograd.grad((first ** 2).sum(), r, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with "
                                           "@once_differentiable"):
        second.sum().backward()


@pytest.mark.skipif(not native.available(), reason="native ops not built")
def test_training_edge_encoder_computes_weight_gradients_only_in_passes_that_need_them():
    """The force pass (gradient with respect to the geometry only) runs the plain backward op; a pass that
    reaches the weights runs the one with weight gradients, and they are right (the second-order test above)."""
    from torch.profiler import ProfilerActivity, profile

    vectors, receivers, senders, species, atoms, weights = encoder_inputs()
    weights = EdgeWeights(*[p.clone().requires_grad_(i >= 3) if isinstance(p, torch.Tensor) else p
                            for i, p in enumerate(weights)])
    r = vectors.clone().requires_grad_(True)

    def ops_called(run):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return {event.key for event in prof.key_averages()}

    outputs = TrainingEdgeEncoder()(r, receivers, senders, species, atoms, weights)
    energy = sum(o.sum() for o in outputs)
    forces = []
    called = ops_called(lambda: forces.append(torch.autograd.grad(energy, r, create_graph=True)[0]))
    assert "transip::edge_encoder_backward" in called and "transip::edge_encoder_train_backward" not in called
    called = ops_called(lambda: (energy + (forces[0] ** 2).sum()).backward())
    assert "transip::edge_encoder_train_backward" in called and "transip::edge_encoder_double_backward" in called
    assert all(p.grad is not None for p in (weights.w1, weights.w2, weights.w_bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radial_basis_tails_are_zero_not_denormal(dtype):
    """The Gaussian basis's far tails would be denormal (slow in every product): below exp_floor, which is
    ceil(log(tiny / eps)) of the type, the basis is exactly 0, gradient included; above it, exp itself."""
    info = torch.finfo(dtype)
    assert analytic.exp_floor(dtype) == float(math.ceil(math.log(info.tiny / info.eps)))
    centers = torch.linspace(0.0, 5.0, 16, dtype=dtype)
    lengths = torch.linspace(0.0, 5.0, 2001, dtype=dtype).requires_grad_(True)
    width = 5.0 / 16 / 4  # narrow, so that the tails reach far below the floor
    basis = analytic.gaussian_basis(lengths, centers, width)
    exponent = -0.5 * ((lengths.detach()[:, None] - centers) / width) ** 2
    below = exponent < analytic.exp_floor(dtype)
    assert below.any() and (~below).any()
    assert bool((basis[below] == 0).all())
    torch.testing.assert_close(basis[~below], torch.exp(exponent[~below]), rtol=0, atol=0)
    (gradient,) = torch.autograd.grad(basis.sum(), lengths)
    for values in (basis.detach(), gradient):
        assert not bool(((values != 0) & (values.abs() < info.tiny)).any()), "denormal values"

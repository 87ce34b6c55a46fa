import pytest
import torch

from flatlab.data import (
    Quadratic,
    quadratic,
    teacher_student_classification,
    teacher_student_regression,
)


def test_teacher_student_regression_is_teacher_plus_noise():
    clean = teacher_student_regression(n=200, in_dim=5, out_dim=2, noise=0.0, seed=1)
    noisy = teacher_student_regression(n=200, in_dim=5, out_dim=2, noise=0.5, seed=1)
    assert clean.num_classes is None and clean.task == "regression" and clean.out_dim == 2
    assert clean.train[1].shape == (140, 2) and clean.train[1].dtype == torch.float32
    assert torch.equal(clean.train[0], noisy.train[0])  # same inputs and teacher
    resid = noisy.train[1] - clean.train[1]
    assert 0.4 < float(resid.std()) < 0.6
    # a deterministic function of x: equal inputs give equal clean targets across seeds' reuse
    again = teacher_student_regression(n=200, in_dim=5, out_dim=2, noise=0.0, seed=1)
    assert torch.equal(again.test[1], clean.test[1])


def test_teacher_student_classification_labels():
    s = teacher_student_classification(n=600, in_dim=4, num_classes=3, seed=0)
    y = torch.cat([s.train[1], s.val[1], s.test[1]])
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert len(set(y.tolist())) >= 2
    assert s.num_classes == 3 and s.input_shape == (4,)
    flipped = teacher_student_classification(n=600, in_dim=4, num_classes=3, seed=0, noise=1.0)
    assert not torch.equal(flipped.train[1], s.train[1])
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        teacher_student_classification(num_classes=1)
    with pytest.raises(ValueError, match="noise must be >= 0, got -1.0"):
        teacher_student_regression(noise=-1.0)


def test_quadratic_value_gradient_hessian():
    q = quadratic([5.0, 2.0, 0.5], seed=0)
    A, theta = q.A, q.theta.detach()
    assert torch.allclose(q.eigenvalues(), torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64))
    loss = q()
    assert torch.allclose(loss, 0.5 * theta @ A @ theta)
    (g,) = torch.autograd.grad(q(), q.theta)
    assert torch.allclose(g, A @ theta)
    H = torch.autograd.functional.hessian(lambda t: 0.5 * t @ A @ t, theta)
    assert torch.allclose(H, A)
    assert torch.equal(Quadratic.loss_fn(q(*Quadratic.dummy_data()[:1])), q())


def test_gd_on_quadratic_is_stable_iff_lr_below_two_over_lambda_max():
    for lr, stable in ((2 / 5.0 * 0.95, True), (2 / 5.0 * 1.05, False)):
        q = quadratic([5.0, 1.0], seed=3)
        start = float(q().detach())
        for _ in range(60):  # plain gradient descent through autograd
            (g,) = torch.autograd.grad(q(), q.theta)
            with torch.no_grad():
                q.theta -= lr * g
        assert (float(q().detach()) < start) == stable


def test_quadratic_bad_inputs():
    with pytest.raises(ValueError, match="A must be a square matrix"):
        Quadratic(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="A must be symmetric"):
        Quadratic(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"theta0 must have shape \(2,\), got \(3,\)"):
        Quadratic(torch.eye(2), theta0=torch.zeros(3))
    with pytest.raises(ValueError, match="eigenvalues must be non-empty"):
        quadratic([])

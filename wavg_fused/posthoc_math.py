"""The math of post-hoc EMA (Karras et al. 2024, EDM2, Appendix C.2 and Algorithm 3), in float64.

A power-function EMA with exponent ``gamma``, read at time ``t``, averages the weights seen at
times ``tau`` in ``[0, t]`` with the density ``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)``
(its discrete form is ``wavg_fused.PowerEMA``: ``beta_t = (1 - 1/t)**(gamma + 1)``). Snapshots of
a few such averages, taken now and then, are combined with the weights ``x`` that make
``sum_i x_i p_i`` the least-squares fit of a target profile ``p_r``: ``A x = b`` with
``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_r>``, the inner products in closed form below.
"""

from __future__ import annotations

import torch

__all__ = ["profile_inner", "solve_weights", "fit_error"]


def _f64(values: object) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def profile_inner(t_a: object, gamma_a: object, t_b: object, gamma_b: object) -> torch.Tensor:
    """``<p_a, p_b>``, the integral over ``tau`` of the product of two power-function profiles
    (broadcast over the arguments): with ``m = min(t_a, t_b)``,

    ``(gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * m**(gamma_a + gamma_b + 1)
    / (t_a**(gamma_a + 1) t_b**(gamma_b + 1))``,

    evaluated through logarithms, so large exponents and times neither overflow nor underflow
    before the ratio is taken.

    >>> round(float(profile_inner(1.0, 0.0, 1.0, 0.0)), 6)   # the uniform density on [0, 1]
    1.0
    >>> round(float(profile_inner(1.0, 0.0, 2.0, 0.0)), 6)   # uniform on [0, 1] against [0, 2]
    0.5
    """
    t_a, gamma_a, t_b, gamma_b = (_f64(v) for v in (t_a, gamma_a, t_b, gamma_b))
    if bool((t_a <= 0).any() or (t_b <= 0).any()):
        raise ValueError("profile_inner: the times must be > 0")
    log_m = torch.minimum(t_a, t_b).log()
    log_value = (
        torch.log((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1))
        + (gamma_a + gamma_b + 1) * log_m
        - (gamma_a + 1) * t_a.log()
        - (gamma_b + 1) * t_b.log()
    )
    return log_value.exp()


def _system(t_i: torch.Tensor, gamma_i: torch.Tensor, t_r: float, gamma_r: float) -> tuple[torch.Tensor, ...]:
    t_i, gamma_i = _f64(t_i).reshape(-1), _f64(gamma_i).reshape(-1)
    gram = profile_inner(t_i[:, None], gamma_i[:, None], t_i[None, :], gamma_i[None, :])
    target = profile_inner(t_i, gamma_i, t_r, gamma_r)
    return gram, target


def solve_weights(t_i: object, gamma_i: object, t_r: float, gamma_r: float) -> torch.Tensor:
    """The weights ``x`` (float64, one per snapshot) whose combination of the snapshot profiles
    ``(t_i, gamma_i)`` best fits the profile ``(t_r, gamma_r)`` in least squares.

    Solved with ``torch.linalg.lstsq`` (the paper's Algorithm 3 uses numpy's ``lstsq``): the Gram
    matrix of many snapshots is nearly singular, and the least-squares solution with its
    default cutoff stays bounded where a plain solve can return huge cancelling weights.

    A target that is one of the snapshots gets weight 1 on it (up to rounding):

    >>> x = solve_weights([10.0, 20.0, 10.0, 20.0], [5.0, 5.0, 16.0, 16.0], 20.0, 16.0)
    >>> [round(float(v), 6) + 0.0 for v in x]
    [0.0, 0.0, 0.0, 1.0]
    """
    gram, target = _system(_f64(t_i), _f64(gamma_i), t_r, gamma_r)
    return torch.linalg.lstsq(gram, target[:, None]).solution[:, 0]


def fit_error(t_i: object, gamma_i: object, t_r: float, gamma_r: float, weights: torch.Tensor) -> float:
    """How far ``sum_i weights_i p_i`` lies from the target profile ``p_r``, relative to it:
    ``||sum_i x_i p_i - p_r|| / ||p_r||`` in L2 (``x'Ax - 2x'b + <p_r, p_r>``, then the root).

    >>> t, g = [50.0, 100.0, 50.0, 100.0], [5.0, 5.0, 16.0, 16.0]
    >>> fit_error(t, g, 100.0, 9.0, solve_weights(t, g, 100.0, 9.0)) < 0.1   # 4 snapshots: 7%
    True
    """
    gram, target = _system(_f64(t_i), _f64(gamma_i), t_r, gamma_r)
    x = _f64(weights)
    own = profile_inner(t_r, gamma_r, t_r, gamma_r)
    squared = x @ gram @ x - 2 * x @ target + own
    return float(squared.clamp_min(0).sqrt() / own.sqrt())

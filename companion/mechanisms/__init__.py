r"""The basic mechanisms of differential privacy.

A randomized mechanism :math:`M` is :math:`(\varepsilon, \delta)`-differentially private if for
every pair of neighbouring data sets :math:`D, D'` and every set of outputs :math:`S`

.. math::

    \Pr[M(D) \in S] \le e^{\varepsilon} \Pr[M(D') \in S] + \delta

(Dwork, McSherry, Nissim and Smith 2006; Dwork and Roth 2014, Definition 2.4). This package holds
the mechanisms the book's differential-privacy chapter teaches: randomized response, the Laplace
mechanism, the Gaussian mechanism with its classic and analytic calibrations, the exponential
mechanism and report noisy max, and counting and sum queries with clipped contributions.

It has one module per idea, and everything is importable from ``companion.mechanisms``
directly: ``laplace`` (the Laplace mechanism), ``gaussian`` (the Gaussian mechanism and its
calibrations), ``response`` (randomized response), ``selection`` (the exponential mechanism and
report noisy max) and ``queries`` (counts and clipped sums).

.. warning::

    These samplers are for teaching. They draw noise from numpy's pseudo-random generator, which
    is not a cryptographically secure source, and they add floating-point Laplace and Gaussian
    noise, whose low-order bits can reveal the exact value they were added to (Mironov 2012, "On
    Significance of the Least Significant Bits for Differential Privacy"). A production release
    needs a library built for it, such as OpenDP (https://opendp.org), which samples noise
    exactly (for example the discrete Gaussian of Canonne, Kamath and Steinke 2020) from a secure
    source.
"""

from companion.mechanisms.gaussian import (
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_mechanism,
    gaussian_privacy_profile,
)
from companion.mechanisms.laplace import laplace_mechanism
from companion.mechanisms.queries import Neighbouring as Neighbouring
from companion.mechanisms.queries import private_count, private_sum, sum_sensitivity
from companion.mechanisms.response import (
    randomized_response,
    randomized_response_estimate,
    randomized_response_keep_probability,
)
from companion.mechanisms.selection import (
    exponential_mechanism,
    exponential_mechanism_probabilities,
    report_noisy_max,
)

__all__ = [
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "exponential_mechanism",
    "exponential_mechanism_probabilities",
    "gaussian_mechanism",
    "gaussian_privacy_profile",
    "laplace_mechanism",
    "private_count",
    "private_sum",
    "randomized_response",
    "randomized_response_estimate",
    "randomized_response_keep_probability",
    "report_noisy_max",
    "sum_sensitivity",
]

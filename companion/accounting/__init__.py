"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-SGD, DP-FedAvg).

- :mod:`companion.accounting.rdp`: Renyi-DP analysis (:func:`compute_rdp`,
  :func:`get_privacy_spent`), and :mod:`companion.accounting.rdp_accountant`: the
  :class:`RDPAccountant` built on it;
- :mod:`companion.accounting.pld`: the :class:`PLDAccountant` (privacy loss distributions,
  connect-the-dots discretisation, FFT composition): nearly tight for runs of up to some
  thousands of steps, where RDP is loose; its grid's error grows with the number of steps, so
  over very many steps that each leak very little (millions of steps at a large noise
  multiplier) RDP can be the tighter of the two. Both are upper bounds: take the smaller;
- :mod:`companion.accounting.calibration`: :func:`get_noise_multiplier`, the smallest noise
  multiplier that meets a target epsilon;
- :mod:`companion.accounting.steps`: :func:`steps_for_epochs`, the steps rule of the training loop.

Everything is importable from ``companion.accounting`` directly.
"""

from companion.accounting.calibration import get_noise_multiplier
from companion.accounting.pld import PLDAccountant
from companion.accounting.rdp import DEFAULT_ORDERS, compute_rdp, get_privacy_spent
from companion.accounting.rdp_accountant import RDPAccountant
from companion.accounting.steps import steps_for_epochs

__all__ = [
    "DEFAULT_ORDERS",
    "PLDAccountant",
    "RDPAccountant",
    "compute_rdp",
    "get_noise_multiplier",
    "get_privacy_spent",
    "steps_for_epochs",
]

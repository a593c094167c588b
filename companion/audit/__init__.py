r"""Empirical privacy auditing: lower bounds on epsilon from attacks that are run.

An accountant gives an *upper* bound on epsilon, proved for the mechanism it assumes. An audit
runs the mechanism as implemented, attacks it with canaries and turns the attack's success into a
*lower* bound that holds with a stated confidence. A lower bound above the claimed epsilon means
the implementation is not the mechanism the accountant analysed (a bug); a lower bound well below
it says nothing against the claim (the attack may be weak, or the accounting loose).

- :mod:`companion.audit.bounds`: :func:`epsilon_lower_bound` (Clopper-Pearson bounds on the two
  error rates, Jagielski, Ullman and Oprea 2020) and :func:`threshold_audit` (from scores, with a
  threshold chosen on separate trials);
- :mod:`companion.audit.gradient_canary`: :func:`audit_dpsgd`, a white-box Dirac gradient canary
  against DP-SGD steps, many trials (Nasr et al. 2021; Nasr et al. 2023), with the default step
  :func:`dpsgd_noisy_sum` replaceable by any implementation;
- :mod:`companion.audit.one_run`: :func:`one_run_epsilon_lower_bound` and :func:`one_run_audit`,
  many canaries in one run (Steinke, Nasr and Jagielski 2023);
- :mod:`companion.audit.canary_clients`: :func:`audit_dp_fedavg`, random canary clients against
  DP-FedAvg, with the estimate of Andrew et al. (2024) and a Clopper-Pearson bound.

Every function returns a frozen dataclass that holds the bound together with what it assumed:
confidence, delta, number of trials, the threshold and how it was chosen, and the mechanism.
Everything is importable from ``companion.audit`` directly.
"""

from companion.audit.bounds import (
    EpsilonLowerBound,
    ThresholdAudit,
    clopper_pearson_upper,
    epsilon_lower_bound,
    threshold_audit,
)
from companion.audit.canary_clients import (
    CanaryClientAudit,
    audit_dp_fedavg,
    dp_fedavg_noisy_mean,
    two_gaussians_epsilon,
)
from companion.audit.gradient_canary import GradientCanaryAudit, audit_dpsgd, dpsgd_noisy_sum
from companion.audit.one_run import (
    OneRunAudit,
    OneRunBound,
    one_run_audit,
    one_run_epsilon_lower_bound,
)

__all__ = [
    "CanaryClientAudit",
    "EpsilonLowerBound",
    "GradientCanaryAudit",
    "OneRunAudit",
    "OneRunBound",
    "ThresholdAudit",
    "audit_dp_fedavg",
    "audit_dpsgd",
    "clopper_pearson_upper",
    "dp_fedavg_noisy_mean",
    "dpsgd_noisy_sum",
    "epsilon_lower_bound",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "threshold_audit",
    "two_gaussians_epsilon",
]

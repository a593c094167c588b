r"""The ROC curve of a membership-inference attack and its summaries.

:class:`MembershipAttackResult` holds an attack's scores for members and non-members and the ROC
curve they trace as the threshold moves, with the area under it, the true-positive rate at a small
false-positive rate (the measure of Carlini et al. 2022), the membership advantage (Yeom et al.
2018) and a log-log plot. Every membership attack of :mod:`companion.attacks` returns one; the
bound that differential privacy puts on the curve is in :mod:`companion.attacks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import roc_curve

from companion._validation import check_real

__all__ = ["MembershipAttackResult"]


def _check_scores(name: str, scores: object) -> np.ndarray:
    """A non-empty one-dimensional array of finite real scores, returned as float64."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    if not isinstance(scores, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array or a torch.Tensor, got {type(scores).__name__}."
        )
    if (
        scores.dtype == bool
        or not np.issubdtype(scores.dtype, np.number)
        or np.iscomplexobj(scores)
    ):
        raise TypeError(f"{name} must hold real numbers, got dtype {scores.dtype}.")
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {scores.shape}.")
    if scores.size == 0:
        raise ValueError(f"{name} must hold at least one score.")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} must not contain NaN or infinite values.")
    return scores


@dataclass(frozen=True)
class MembershipAttackResult:
    r"""The outcome of a membership-inference attack: its scores and its ROC curve.

    Members are the positive class, and a *higher* score means "member". For a threshold
    :math:`\tau` the attack guesses "member" when the score is at least :math:`\tau`; then
    :math:`\mathrm{TPR}(\tau)` is the share of members and :math:`\mathrm{FPR}(\tau)` the share
    of non-members guessed "member". :func:`companion.attacks.loss_threshold_attack` and
    :func:`companion.attacks.lira_attack` return one; :meth:`from_scores` builds one from any
    scores.

    Attributes:
        member_scores: the attack score of each member, float64.
        nonmember_scores: the attack score of each non-member, float64.
        fpr: false-positive rates of the ROC curve, non-decreasing from 0 to 1
            (:func:`sklearn.metrics.roc_curve` with ``drop_intermediate=False``: one point per
            distinct score, plus the starting point (0, 0)).
        tpr: the matching true-positive rates, non-decreasing from 0 to 1.
        auc: the area under the ROC curve (trapezoidal rule), which equals the Mann-Whitney
            probability :math:`\Pr[s_{\text{member}} > s_{\text{non-member}}] + \tfrac12
            \Pr[s_{\text{member}} = s_{\text{non-member}}]` over independent draws from the two
            sets: 0.5 for an attack that cannot tell them apart, 1 for a perfect one.

    Example:
        >>> result = MembershipAttackResult.from_scores(np.array([3.0, 2.0]), np.array([1.0]))
        >>> result.auc, result.tpr_at(0.5), result.advantage()
        (1.0, 1.0, 1.0)
    """

    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float

    @classmethod
    def from_scores(
        cls, member_scores: np.ndarray | torch.Tensor, nonmember_scores: np.ndarray | torch.Tensor
    ) -> MembershipAttackResult:
        """The ROC curve and its area for given scores (higher means "member").

        Args:
            member_scores: one finite score per member, a non-empty 1-D array or tensor.
            nonmember_scores: one finite score per non-member, likewise.

        Returns:
            The :class:`MembershipAttackResult` of these scores.

        Raises:
            TypeError: if the scores are not a numpy array or tensor of real numbers.
            ValueError: if they are empty, not one-dimensional, or not finite.

        Example:
            >>> result = MembershipAttackResult.from_scores(np.array([3.0, 2.0]),
            ...                                             np.array([1.0, 2.0]))
            >>> result.auc  # P(member > non-member) + P(tie) / 2 = (3 + 0.5) / 4
            0.875
        """
        members = _check_scores("member_scores", member_scores)
        nonmembers = _check_scores("nonmember_scores", nonmember_scores)
        labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
        scores = np.concatenate([members, nonmembers])
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        auc = float(_trapezoid_auc(fpr, tpr))
        return cls(member_scores=members, nonmember_scores=nonmembers, fpr=fpr, tpr=tpr, auc=auc)

    def tpr_at(self, fpr: float) -> float:
        r"""The largest true-positive rate among the thresholds with false-positive rate <= ``fpr``.

        .. math:: \mathrm{TPR}@\alpha = \max\{\mathrm{TPR}(\tau) : \mathrm{FPR}(\tau) \le \alpha\}

        Carlini, Chien, Nasr, Song, Terzis and Tramèr 2022 ("Membership Inference Attacks From
        First Principles", IEEE S&P) argue for this measure at a small :math:`\alpha` (they
        report 0.1% and 0.001%) instead of accuracy or AUC: an attack that identifies a few
        members with confidence is a real privacy breach, while one that is right slightly more
        often than chance on everyone, which is what an AUC of 0.6 may mean, may expose no one.
        With :math:`m` non-members the curve moves in steps of :math:`1/m`, so at most
        :math:`\lfloor \alpha m \rfloor` non-members may score above the threshold (none at all
        for :math:`\alpha m < 1`: then this is the TPR at zero false positives); a meaningful
        estimate at 1% needs a few hundred non-members at least.

        Args:
            fpr: the largest admissible false-positive rate :math:`\alpha`, in the open
                interval (0, 1).

        Returns:
            The true-positive rate, in [0, 1].

        Raises:
            TypeError: if ``fpr`` is not a real number.
            ValueError: if ``fpr`` is not in (0, 1).

        Example:
            >>> result = MembershipAttackResult.from_scores(np.array([5.0, 4.0, 2.0]),
            ...                                             np.array([3.0, 0.0]))
            >>> result.tpr_at(0.01), result.tpr_at(0.5)
            (0.6666666666666666, 1.0)
        """
        alpha = check_real("fpr", fpr)
        if not 0 < alpha < 1:
            raise ValueError(f"fpr must lie in the open interval (0, 1), got {alpha}.")
        return float(self.tpr[self.fpr <= alpha].max())  # the curve starts at (0, 0)

    def advantage(self) -> float:
        r"""The membership advantage :math:`\max_\tau \mathrm{TPR}(\tau) - \mathrm{FPR}(\tau)`.

        Yeom et al. 2018 define the advantage of an attack as :math:`\mathrm{TPR} -
        \mathrm{FPR}`, which is twice its accuracy minus one when members and non-members are
        equally likely; the best threshold gives this maximum (the one-sided Kolmogorov-Smirnov
        statistic of the two empirical score distributions, members above non-members). It is 0
        for guessing and 1 for a perfect attack.

        Which bound differential privacy puts on it depends on what the members are compared
        with. For one example, trained on with it or without it, :math:`(\varepsilon,
        \delta)`-DP under add/remove bounds the ROC curve by :math:`\mathrm{TPR} \le
        e^\varepsilon\, \mathrm{FPR} + \delta` and :math:`1 - \mathrm{FPR} \le
        e^\varepsilon (1 - \mathrm{TPR}) + \delta` at every threshold fixed in advance; the two
        lines meet at :math:`\mathrm{FPR} = (1 - \delta) / (e^\varepsilon + 1)`, so the advantage
        is at most :math:`(e^\varepsilon - 1 + 2\delta) / (e^\varepsilon + 1)`, which is
        :math:`\tanh(\varepsilon / 2)` for :math:`\delta = 0`. The same holds when the examples
        enter training by independent coin flips, members being those the coin put in, and the
        attack uses nothing else that depends on those coins. Members compared with *other*
        examples as non-members, the two groups a uniformly random split of one pool with the
        training set's size fixed, are neighbours under replace, where the guarantee is only
        :math:`(2\varepsilon, (1 + e^\varepsilon)\delta)`: then
        :math:`\mathrm{TPR} \le e^{2\varepsilon}\, \mathrm{FPR} + (1 + e^\varepsilon)\delta`.
        Yeom et al. (2018, Theorem 1) bound the advantage by :math:`e^\varepsilon - 1` in their
        experiment, where the training set's size is fixed, so for :math:`\varepsilon`-DP under
        replace. If members and non-members come from different distributions, no DP bound
        applies: an attack may tell them apart by their source alone. These bounds are on the
        *probabilities*; the rates measured on finitely many examples scatter around them, and
        a threshold chosen on the same scores favours the attack.

        Returns:
            The advantage, in [0, 1].

        Example:
            >>> result = MembershipAttackResult.from_scores(np.array([5.0, 4.0, 2.0, 1.0]),
            ...                                             np.array([3.0, 0.0]))
            >>> result.advantage()  # at tau = 4: TPR 1/2, FPR 0; at tau = 1: TPR 1, FPR 1/2
            0.5
        """
        return float(np.max(self.tpr - self.fpr))

    # Any, not matplotlib.axes.Axes: matplotlib is an optional dependency (the book extra).
    def plot(self, ax: Any = None, *, label: str | None = None, log: bool = True) -> Any:
        r"""Draw the ROC curve, on log-log axes by default, with the diagonal of guessing.

        Carlini et al. 2022 plot ROC curves on log-log axes so that the region that matters, a
        false-positive rate of 1% or far less, is visible: on linear axes every attack looks
        like the diagonal there. The x axis starts at half a step, :math:`1 / (2m)` for :math:`m`
        non-members, the resolution of the measured curve (points with FPR 0 cannot be drawn
        on a log axis). Needs matplotlib (the ``book`` extra).

        Args:
            ax: the ``matplotlib.axes.Axes`` to draw on; ``None`` draws on the current axes.
            label: the legend label of the curve; ``None`` labels it with its AUC.
            log: log-log axes (``True``) or linear axes.

        Returns:
            The ``matplotlib.axes.Axes`` drawn on.

        Raises:
            ImportError: if matplotlib is not installed.

        Example:
            >>> import matplotlib.pyplot as plt
            >>> result = MembershipAttackResult.from_scores(np.arange(10.0), np.arange(10.0) - 2)
            >>> fig, ax = plt.subplots()
            >>> _ = result.plot(ax, label="an attack")
            >>> ax.get_xscale(), [float(limit) for limit in ax.get_xlim()]  # from 1 / (2 * 10)
            ('log', [0.05, 1.0])
            >>> plt.close(fig)
        """
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        ax.plot(self.fpr, self.tpr, label=f"AUC {self.auc:.3f}" if label is None else label)
        low = 0.5 / self.nonmember_scores.size if log else 0.0
        ax.plot([low, 1.0], [low, 1.0], color="grey", linestyle=":", linewidth=1)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlim(low, 1.0)
        ax.set_ylim(low, 1.0)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        return ax

r"""Attacks that show why models and model updates leak.

Two families, one against a trained model and one against the updates of federated learning.
Every name below is importable from ``companion.attacks`` directly.

**Membership inference** asks, given a trained model and an example, whether the example was
in the training set:

- ``companion.attacks.membership``: :func:`loss_threshold_attack`, the attack of Yeom,
  Giacomelli, Fredrikson and Jha 2018 ("Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting", IEEE CSF): a model fits its training examples better than unseen
  ones, so an example with a low loss is guessed to be a member; and :func:`logit_confidence`,
  the per-example signal that LiRA models.
- ``companion.attacks.lira``: :func:`lira_attack`, the likelihood-ratio attack of Carlini,
  Chien, Nasr, Song, Terzis and Tramèr 2022 ("Membership Inference Attacks From First
  Principles", IEEE S&P), which calibrates the test per example with shadow models; its pieces
  :func:`shadow_confidences` and :func:`lira_scores`.
- ``companion.attacks.roc``: :class:`MembershipAttackResult`, an attack's scores and ROC
  curve, with the area under it, the true-positive rate at a small false-positive rate, the
  membership advantage and a log-log plot.

**Gradient inversion**: a server (or anyone who sees the traffic) that receives one client's
gradient can often reconstruct the client's training inputs from it.

- ``companion.attacks.inversion``: :func:`model_gradient`, the gradient one client shares in
  FedSGD, and :func:`invert_gradient`, which reconstructs the inputs behind it by *gradient
  matching* (Deep Leakage from Gradients, Zhu, Liu and Han 2019, NeurIPS; the cosine refinement
  of Geiping, Bauermeister, Dröge and Moeller 2020, "Inverting Gradients - How Easy Is It to
  Break Privacy in Federated Learning?", NeurIPS), with the label of a single example recovered
  analytically (iDLG, Zhao, Mopuri and Bilen 2020).
- ``companion.attacks.reconstruction``: :func:`reconstruction_similarity`, how close a
  reconstruction is to the original image (Pearson correlation of the pixels).

.. rubric:: Membership inference as a hypothesis test

The attacker sees an example :math:`z` and tests :math:`H_0`: ":math:`z` was not in the training
set" against :math:`H_1`: "it was", by comparing a score :math:`s(z)` (minus the loss, or LiRA's
likelihood ratio) with a threshold :math:`\tau`. Every threshold gives a false-positive rate
:math:`\mathrm{FPR}(\tau) = \Pr[s(z) \ge \tau \mid H_0]` and a true-positive rate
:math:`\mathrm{TPR}(\tau) = \Pr[s(z) \ge \tau \mid H_1]`; sweeping :math:`\tau` traces the ROC
curve. Differential privacy bounds that curve directly: if training is
:math:`(\varepsilon, \delta)`-DP, adding or removing :math:`z` changes the probability of any
event about the model by at most a factor :math:`e^\varepsilon` and an additive :math:`\delta`, so
every test satisfies

.. math::
    :label: attacks-dp-roc

    \mathrm{TPR} \le e^{\varepsilon}\, \mathrm{FPR} + \delta

(Wasserman and Zhou 2010; Kairouz, Oh and Viswanath 2015, "The Composition Theorem for
Differential Privacy", ICML). Summaries of the curve: the area under it (0.5 for guessing), the
TPR at a small FPR such as 1% (the measure Carlini et al. 2022 argue for: an attack that is sure
about a few people matters more than one that is right 55% of the time about everyone), and the
advantage :math:`\max_\tau \mathrm{TPR} - \mathrm{FPR}` (Yeom et al. 2018). The bound holds at
a threshold fixed in advance, for one example's two worlds. Measured rates compare members with
*other* examples as non-members: where those entered training by independent coin flips (and the
attack uses nothing else that depends on those coins), the bound above applies; where they are a
random split of one pool with the training set's size fixed, that of
:math:`(2\varepsilon, (1 + e^\varepsilon)\delta)` (replace); for groups from different
distributions, none (:meth:`MembershipAttackResult.advantage`).

.. rubric:: Why a fully connected first layer gives the input away

Let the first layer be :math:`z = W x + b` and let :math:`\ell` be the loss of a *single*
example. By the chain rule :math:`\partial \ell / \partial W = \delta\, x^\top` and
:math:`\partial \ell / \partial b = \delta` with :math:`\delta = \partial \ell / \partial z`.
So for every row :math:`i` with :math:`\delta_i \ne 0`,

.. math::
    :label: attacks-phong

    x = \frac{(\nabla_W \ell)_{i,:}}{(\nabla_b \ell)_i}

exactly, with no optimisation at all (Phong, Aono, Hayashi, Wang and Moriai 2017/2018,
"Privacy-Preserving Deep Learning via Additively Homomorphic Encryption"). The gradient of such
a layer *is* the input, scaled; this is why even the simple optimisation attack reconstructs
digits almost perfectly from the gradient of a multilayer perceptron. For a batch of several
examples the rows are sums :math:`\sum_j \delta_{j,i} x_j^\top` and the inputs mix, which makes
the attack harder but not impossible.

.. rubric:: Defences against gradient inversion

Clipping the update to norm :math:`C` and adding Gaussian noise of standard deviation
:math:`\sigma C` per coordinate, as DP-SGD and DP-FedAvg do, drowns the signal: at
:math:`\sigma = 1` the reconstructions from the gradients of ten digits, one of each class,
each correlate with their digit by less than 0.3, about the 99th percentile of a random image's
correlation with a digit, and on average more than a fifth of the other training digits resemble
them more than their own digit does (``tests/test_inversion.py`` measures this). That one
attack fails is no guarantee; the differential privacy of the noisy update is.
"""

from companion.attacks.inversion import InversionResult, invert_gradient, model_gradient
from companion.attacks.lira import lira_attack, lira_scores, shadow_confidences
from companion.attacks.membership import logit_confidence, loss_threshold_attack
from companion.attacks.reconstruction import reconstruction_similarity
from companion.attacks.roc import MembershipAttackResult

__all__ = [
    "InversionResult",
    "MembershipAttackResult",
    "invert_gradient",
    "lira_attack",
    "lira_scores",
    "logit_confidence",
    "loss_threshold_attack",
    "model_gradient",
    "reconstruction_similarity",
    "shadow_confidences",
]

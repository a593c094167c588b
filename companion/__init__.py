"""Companion code for the open textbook *Privacy in Machine Learning*.

One module per idea, named after what it holds:

- :mod:`companion.data`: the data sets the chapters use (digits, a synthetic patient table);
- :mod:`companion.mechanisms`: randomized response, the Laplace, Gaussian and exponential
  mechanisms, counting and sum queries;
- :mod:`companion.composition`: basic and advanced composition, group privacy.

The code is written to teach: it is tested and its guarantees are stated exactly, but its noise
samplers are not hardened for production use (see :mod:`companion.mechanisms`).
"""

__version__ = "0.1.0"

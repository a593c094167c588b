"""Progress bars for the package's loops (private).

One tqdm bar per loop, shown or not by the loop's ``progress`` flag: over the epochs or rounds
of a training function, showing the newest record (:func:`progress_loop`), or over any other
loop (:func:`progress_bar`). Like :mod:`companion._torch`, one of the private modules other
modules may import from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

from companion._validation import check_flag

__all__ = ["progress_bar", "progress_loop"]

#: The keys of a record that the bar of :func:`progress_loop` shows, where the record has them.
_SHOWN = ("train_loss", "train_accuracy", "test_accuracy", "epsilon")


def progress_loop(
    count: int, *, history: list[dict[str, Any]], desc: str, unit: str, progress: bool
) -> Iterator[int]:
    """Yield 1, ..., ``count`` under a tqdm bar that shows the newest record of ``history``.

    The loop body appends one record per iteration; the bar counts an iteration when its body
    is done, together with its record, and is closed however the loop ends.
    """
    hidden = not check_flag("progress", progress)
    # Drawn at every epoch or round (mininterval=0): they are few, and each has its record.
    bar = tqdm(total=count, desc=desc, unit=unit, disable=hidden, mininterval=0)
    try:
        for i in range(1, count + 1):
            yield i
            if history:
                shown = {k: f"{history[-1][k]:.3g}" for k in _SHOWN if k in history[-1]}
                bar.set_postfix(shown, refresh=False)  # drawn by the update
            bar.update()
    finally:
        bar.close()


def progress_bar(iterable: Iterable[Any], *, progress: object, desc: str, unit: str) -> tqdm:
    """A tqdm bar over ``iterable``, shown if ``progress`` (which must be True or False)."""
    return tqdm(iterable, desc=desc, unit=unit, disable=not check_flag("progress", progress))

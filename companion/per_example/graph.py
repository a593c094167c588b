"""What the autograd graph of a batch's loss shows the engine.

Part of :mod:`companion.per_example`; import from there. Which operations read each parameter
(:func:`autograd_graph`: a rule applies to a layer whose parameters its one call reads), whether
a reentrant checkpoint hides layers (:func:`refuse_reentrant_checkpoint`), and which layers' outputs
lie above another's (:func:`above_others`: the backward pass reaches them first).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node

__all__: list[str] = []


def autograd_graph(loss: torch.Tensor) -> tuple[Counter[int], set[object]]:
    """The operations of the autograd graph of ``loss``, and how many of them read each leaf.

    Returns ``(reads, nodes)``: ``reads[id(t)]`` counts the operations that read the leaf tensor
    ``t`` (a trainable parameter), and ``nodes`` holds every operation's node (a tensor's
    ``grad_fn``). A rule computes a layer's gradients from its one call, so it applies only where
    that call's output is in the graph and each of the layer's parameters is read once: by that
    call. A parameter also read elsewhere (a tied output head ``h @ embedding.weight.t()``) is
    read more often, or, when the call's output does not reach the loss, read only elsewhere.
    """
    reads: Counter[int] = Counter()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    nodes = set(stack)
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            if hasattr(node, "variable"):  # AccumulateGrad: the node of a leaf tensor
                reads[id(node.variable)] += 1
            elif node not in nodes:
                nodes.add(node)
                stack.append(node)
    return reads, nodes


def refuse_reentrant_checkpoint(nodes: set[object]) -> None:
    """Refuse a graph (its ``nodes``, from :func:`autograd_graph`) with a reentrant checkpoint,
    whose layers run without autograd in the forward pass: no rule and no gradient sees them."""
    if any(type(node).__name__ == "CheckpointFunctionBackward" for node in nodes):
        raise ValueError(
            "the model calls torch.utils.checkpoint.checkpoint with use_reentrant=True, which "
            "hides the layers it runs from per-example gradients; pass use_reentrant=False."
        )


def above_others(loss: torch.Tensor, edges: dict[nn.Module, GradientEdge]) -> set[nn.Module]:
    """The layers (keys of ``edges``, their outputs' places in the autograd graph of ``loss``)
    from whose output's node the graph reaches another's: a backward pass that computes the
    lower layer's output gradient runs that node."""
    if len(edges) < 2:  # a layer's node is not below itself
        return set()
    marked = {edge.node for edge in edges.values()}
    below: dict[Node, bool] = {}  # node -> whether a marked node lies below it
    stack: list[tuple[Node, list[Node] | None]] = []
    if loss.grad_fn is not None:
        stack.append((loss.grad_fn, None))
    while stack:  # depth first, each node once, after its children (those found on the way down)
        node, children = stack.pop()
        if children is not None:
            below[node] = any(c in marked or below[c] for c in children)
        elif node not in below:  # not the leaves' AccumulateGrad nodes
            children = [
                c for c, _ in node.next_functions if c is not None and not hasattr(c, "variable")
            ]
            stack.append((node, children))
            stack.extend((c, None) for c in children if c not in below)
    return {module for module, edge in edges.items() if below.get(edge.node, False)}

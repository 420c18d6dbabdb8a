"""Queries and bookkeeping over an ONNX graph's nodes, shared by the rewrites of the export."""

from __future__ import annotations

import onnx


def consumers_of(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def producers_of(graph) -> dict:
    """{value name: the node that outputs it}."""
    return {output: node for node in graph.node for output in node.output}


def attribute_of(node, name: str, default=None):
    """A node's attribute value, `default` where it is not set."""
    for found in node.attribute:
        if found.name == name:
            return onnx.helper.get_attribute_value(found)
    return default


def rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    for output in graph.output:
        if output.name == old:
            output.name = new


def finish(graph) -> None:
    """After a rewrite: initializers nothing reads dropped, nodes in topological order."""
    _drop_unused_initializers(graph)
    _sort_topologically(graph)


def _sort_topologically(graph) -> None:
    """Orders the nodes so each comes after the producers of its inputs (ONNX requires it)."""
    ready = {""} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [node for node in pending if all(name in ready for name in node.input)]
        if not runnable:
            raise ValueError("the ONNX graph has a cycle or an input nothing produces")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [node for node in pending if node not in runnable]
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)

"""IR invariants: use-def links stay in sync, removal of a used node fails, validate finds dangling edges."""

import numpy as np
import pytest

from fusion_ir.ir import Graph, IRError


def small_graph():
    graph = Graph("tf")
    x = graph.add_node("Placeholder", "x").outputs[0]
    w = graph.add_constant("w", np.ones((2, 2), np.float32))
    mm = graph.add_node("MatMul", "mm", [x, w])
    relu = graph.add_node("Relu", "relu", [mm.outputs[0]])
    graph.inputs = [x]
    graph.outputs = [relu.outputs[0]]
    return graph, x, w, mm, relu


def test_set_input_updates_both_ends():
    graph, x, w, mm, relu = small_graph()
    other = graph.add_constant("w2", np.zeros((2, 2), np.float32))

    graph.set_input(mm, 1, other)

    assert w.uses() == []
    assert other.uses() == [(mm, 1)]
    assert mm.inputs[1] is other


def test_uses_is_snapshot():
    graph, x, w, mm, relu = small_graph()
    extra = graph.add_node("Neg", "neg", [mm.outputs[0]])
    replacement = graph.add_node("Identity", "id", [x]).outputs[0]

    for node, index in mm.outputs[0].uses():
        graph.set_input(node, index, replacement)

    assert mm.outputs[0].num_uses == 0
    assert {n.name for n, _ in replacement.uses()} == {"relu", "neg"}
    assert extra.inputs[0] is replacement


def test_remove_used_node_raises():
    graph, x, w, mm, relu = small_graph()

    with pytest.raises(IRError, match="used by 'relu'"):
        graph.remove_node(mm)


def test_remove_graph_output_raises():
    graph, x, w, mm, relu = small_graph()

    with pytest.raises(IRError, match="graph output"):
        graph.remove_node(relu)


def test_replace_all_uses_moves_graph_outputs():
    graph, x, w, mm, relu = small_graph()
    neg = graph.add_node("Neg", "neg", [mm.outputs[0]])

    graph.replace_all_uses(relu.outputs[0], neg.outputs[0])
    graph.remove_node(relu)

    assert graph.outputs == [neg.outputs[0]]
    assert graph.validate() == []


def test_rename_node_renames_tf_outputs():
    graph, x, w, mm, relu = small_graph()

    graph.rename_node(relu, "act")

    assert relu.outputs[0].name == "act:0"
    assert graph.node("act") is relu
    assert graph.node("relu") is None


def test_validate_finds_dangling_input():
    graph, x, w, mm, relu = small_graph()
    orphan = graph.add_node("Neg", "orphan_src", [x])
    graph.set_input(relu, 0, orphan.outputs[0])
    graph.nodes.remove(orphan)

    problems = graph.validate()

    assert any("removed node orphan_src" in p for p in problems)


def test_validate_finds_missing_control_input():
    graph, x, w, mm, relu = small_graph()
    relu.control_inputs.append("ghost")

    assert any("missing node ghost" in p for p in graph.validate())


def test_toposort_orders_producers_first():
    graph, x, w, mm, relu = small_graph()
    graph.nodes.reverse()

    order = [n.name for n in graph.toposort()]

    assert order.index("x") < order.index("mm") < order.index("relu")


def test_toposort_detects_cycle():
    graph, x, w, mm, relu = small_graph()
    graph.set_input(mm, 0, relu.outputs[0])

    with pytest.raises(IRError, match="cycle"):
        graph.toposort()


def test_remove_dead_keeps_nodes_unused_at_import():
    graph, x, w, mm, relu = small_graph()
    graph.add_node("Neg", "unused_at_import", [x])
    graph.meta["keep_nodes"] = {"unused_at_import"}
    graph.set_input(relu, 0, x)

    removed = graph.remove_dead(lambda node: True)

    assert removed == 1
    assert graph.node("mm") is None
    assert graph.node("unused_at_import") is not None
    assert "w:0" not in graph.constants

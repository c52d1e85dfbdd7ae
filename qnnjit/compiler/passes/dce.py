"""Dead-code elimination: drop nodes no graph output depends on. Sound because
IR ops have no side effects."""

from ...ir.graph import Graph


def dead_code_elimination(graph: Graph) -> bool:
    return graph.dead_code_elimination()

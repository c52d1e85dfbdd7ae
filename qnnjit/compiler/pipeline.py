"""The pass pipeline: a literal list, read top to bottom.

Each entry is a named pass (`graph -> changed`, rewriting in place). With
`verify=True` (tests, or QNNJIT_VERIFY=1) the IR verifier runs after every
pass; an error inside a pass names the pass and the ones that ran before it.
QNNJIT_DUMP_IR=dir writes the printed IR after each pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import QnnjitError
from ..ir.graph import Graph
from ..ir.verifier import verify as verify_graph
from .passes.accumulator_ranges import accumulator_ranges
from .passes.constant_folding import constant_folding, constant_folding_with_dequantize
from .passes.cse import cse
from .passes.dce import dead_code_elimination
from .passes.elementwise_tables import elementwise_tables
from .passes.fold_batchnorm import fold_batchnorm
from .passes.fold_zero_points import fold_zero_points
from .passes.fuse_activation import fuse_activation
from .passes.fuse_epilogues import fuse_epilogues
from .passes.qdq_to_integer import qdq_to_integer
from .passes.requantize_pairs import requantize_pairs


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], bool]


PIPELINE: list[Pass] = [
    Pass("constant_folding", constant_folding),
    Pass("cse", cse),
    Pass("dead_code_elimination", dead_code_elimination),
    Pass("fold_batchnorm", fold_batchnorm),
    Pass("qdq_to_integer", qdq_to_integer),
    Pass("fold_zero_points", fold_zero_points),
    Pass("fuse_activation", fuse_activation),
    Pass("elementwise_tables", elementwise_tables),
    Pass("requantize_pairs", requantize_pairs),
    Pass("constant_folding_with_dequantize", constant_folding_with_dequantize),
    Pass("dead_code_elimination", dead_code_elimination),
    # Group kernels, then prove accumulator widths (through the groups' bodies).
    Pass("fuse_epilogues", fuse_epilogues),
    Pass("accumulator_ranges", accumulator_ranges),
]


def run_pipeline(graph: Graph, passes: list[Pass] | None = None, *, verify: bool | None = None):
    """Run `passes` (default: PIPELINE) over `graph` in place; returns the names
    of the passes that changed it."""
    passes = PIPELINE if passes is None else passes
    if verify is None:
        verify = os.environ.get("QNNJIT_VERIFY", "") not in ("", "0")
    dump_dir = os.environ.get("QNNJIT_DUMP_IR")
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        Path(dump_dir, "00_input.ir").write_text(str(graph))
    if verify:
        verify_graph(graph, context="frontend output")
    changed_by = []
    for index, step in enumerate(passes):
        try:
            changed = step.run(graph)
        except QnnjitError:
            raise
        except Exception as exc:
            before = ", ".join(p.name for p in passes[:index]) or "none"
            raise QnnjitError(
                f"compiler pass {step.name!r} failed (after passes: {before}): {exc}"
            ) from exc
        if changed:
            changed_by.append(step.name)
        if verify:
            verify_graph(graph, context=f"after pass {step.name!r}")
        if dump_dir:
            Path(dump_dir, f"{index + 1:02d}_{step.name}.ir").write_text(str(graph))
    return changed_by

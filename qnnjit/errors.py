"""qnnjit's exceptions. Every error a user can cause names the culprit: the node,
the input, or the op, so a message alone says what to fix."""


class QnnjitError(Exception):
    """Base class of every error qnnjit raises on purpose."""


class InputError(QnnjitError, ValueError):
    """Inputs given to a compiled model do not match its declared inputs."""


class ModelError(QnnjitError, ValueError):
    """The model is malformed or inconsistent (names the node or value)."""


class NonConstantInputError(ModelError):
    """An operand qnnjit needs at compile time (a shape, axes, pads...) is a graph
    input. `input_name` names it, so a caller that knows its value (the ONNX
    backend does, at run time) can bind it as a constant and compile again."""

    def __init__(self, message: str, input_name: str):
        super().__init__(message)
        self.input_name = input_name


class UnsupportedModelError(QnnjitError):
    """The model uses ops qnnjit cannot compile; lists every one of them at once."""

    def __init__(self, unsupported: list[dict]):
        self.unsupported = unsupported
        lines = [
            f"  - node {u['name']!r}: op {u['op_type']!r} domain {u['domain'] or 'ai.onnx'!r} "
            f"opset {u['opset']}" + (f" ({u['reason']})" if u.get("reason") else "")
            for u in unsupported
        ]
        super().__init__(
            f"qnnjit cannot compile {len(unsupported)} node(s) of this model:\n" + "\n".join(lines)
        )


class VerificationError(QnnjitError):
    """The IR broke one of its invariants (a compiler bug, or a bad rewrite)."""


class AccumulatorOverflowWarning(UserWarning):
    """An accumulator's proven range leaves int32: its results may wrap."""


class AccumulatorOverflowError(QnnjitError):
    """An accumulator may overflow int32 and ranges are checked strictly."""

"""Arithmetic on tensor dimensions that may be symbolic, for shape functions.

A dim is an int or a symbol string. Products of symbols and integers are
written as canonical product strings (`"N*12"`, `"H*W"`), so a later Reshape
can divide them back out: `flatten([N, 3, 4])` gives `[N, 12]`, and
`reshape([N*12], [-1, 12])` gives `[N, 12]` again. Anything else that depends
on a symbol (a convolution's spatial size with a symbolic height, a sum of
symbols in a Concat) gets a fresh symbol named after the node and the place,
so inference stays deterministic and the verifier can re-derive it.
"""

from __future__ import annotations

from collections import Counter

from ..types import Dim


def _parse(dim: Dim) -> tuple[int, Counter]:
    """(integer coefficient, multiset of symbol factors) of a dim."""
    if isinstance(dim, int):
        return dim, Counter()
    coefficient, symbols = 1, Counter()
    for factor in dim.split("*"):
        if factor.lstrip("-").isdigit():
            coefficient *= int(factor)
        else:
            symbols[factor] += 1
    return coefficient, symbols


def _format(coefficient: int, symbols: Counter) -> Dim:
    if not symbols or coefficient == 0:
        return coefficient
    factors = sorted(symbols.elements())
    if coefficient != 1:
        factors.append(str(coefficient))
    return "*".join(factors)


def product(dims) -> Dim:
    """The product of dims, symbolic where any factor is."""
    coefficient, symbols = 1, Counter()
    for dim in dims:
        c, s = _parse(dim)
        coefficient *= c
        symbols += s
    return _format(coefficient, symbols)


def quotient(numerator: Dim, denominator: Dim) -> Dim | None:
    """numerator / denominator when it divides exactly, else None."""
    cn, sn = _parse(numerator)
    cd, sd = _parse(denominator)
    if cd == 0 or cn % cd or any(sn[s] < n for s, n in sd.items()):
        return None
    return _format(cn // cd, sn - sd)


def is_static(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def fresh(ctx, place: str) -> str:
    """A new symbol for a dim inference cannot express, named by node and place."""
    return f"{ctx.node_name}.{place}"


def total(ctx, dims, place: str) -> Dim:
    """The sum of dims: an int when all are static, the one symbolic dim when
    all others are 0, else a fresh symbol."""
    dims = list(dims)
    if is_static(dims):
        return sum(dims)
    nonzero = [d for d in dims if d != 0]
    return nonzero[0] if len(nonzero) == 1 else fresh(ctx, place)

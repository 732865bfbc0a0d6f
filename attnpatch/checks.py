"""Parameter checks shared by ``Site`` and every method: a bad value fails at construction with
a message naming ``Owner(param=value)``, what is expected and an example, instead of a raw
``'<' not supported between 'int' and 'str'`` at the first forward. Also the reading of
safetensors profiles, so every profile error names the file, the expected format and the fix."""
from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Iterable, Mapping


class ParameterTypeError(TypeError, ValueError):
    """A parameter of the wrong type. Also a ValueError: parameter checks raised ValueError
    before, and code that catches that keeps working."""


def fail(owner: str, param: str, value, expected: str, example, error=ValueError):
    """Raise ``error`` saying ``owner(param=value)`` is wrong, what it must be, and an example."""
    raise error(f"{owner}({param}={value!r}): {param} must be {expected}; e.g. {owner}({param}={example})")


def as_int(value) -> int | None:
    """``value`` as an int when it is one (int, numpy / 0-d torch integer); None otherwise.
    bool and float are not integers here: ``8.5`` must not become 8, nor ``True`` 1."""
    if isinstance(value, (bool, float)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(owner: str, param: str, value, minimum: int = 0, *, odd: bool = False, expected: str | None = None,
              example=None) -> int:
    """``value`` as an int >= ``minimum`` (and odd when asked), or a clear error."""
    expected = expected or f"{'an odd' if odd else 'an'} integer >= {minimum}"
    example = max(minimum, 1) | (1 if odd else 0) if example is None else example
    v = as_int(value)
    if v is None:
        fail(owner, param, value, expected, example, ParameterTypeError)
    if v < minimum or (odd and v % 2 == 0):
        fail(owner, param, value, expected, example)
    return v


def check_ints(owner: str, param: str, value, minimum: int = 1, *, axes: int = 3, exact: bool = False,
               scalar: bool = True, odd: bool = False, expected: str | None = None, example=None):
    """An int (when ``scalar``) or a tuple of 1 to ``axes`` ints (exactly ``axes`` when
    ``exact``; one per grid axis), each >= ``minimum`` (and odd when asked); lists become tuples."""
    one = f"{'odd ' if odd else ''}integers >= {minimum}"
    expected = expected or (f"an integer or a tuple of 1 to {axes} {one} (one per grid axis)" if scalar
                            else f"a tuple of 1 to {axes} {one}")
    example = example or ((3 if odd else 8) if scalar else (8,) * min(axes, 2))
    if scalar and as_int(value) is not None:
        return check_int(owner, param, value, minimum, odd=odd, expected=expected, example=example)
    if not isinstance(value, (tuple, list)):
        fail(owner, param, value, expected, example, ParameterTypeError)
    ints = tuple(as_int(v) for v in value)
    if None in ints:
        fail(owner, param, value, expected, example, ParameterTypeError)
    if not (axes if exact else 1) <= len(ints) <= axes or min(ints) < minimum or (odd and any(v % 2 == 0 for v in ints)):
        fail(owner, param, value, expected, example)
    return ints


def check_number(owner: str, param: str, value, *, low=None, high=None, low_open=False, high_open=False,
                 expected: str | None = None, example=None):
    """A real number (not bool, not NaN) in the given range, or a clear error."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    expected = expected or "a number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
    example = (low if low is not None and not low_open else 1.0) if example is None else example
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(owner, param, value, expected, example, ParameterTypeError)
    if math.isnan(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and (value >= high if high_open else value > high)):
        fail(owner, param, value, expected, example)
    return value


def check_bool(owner: str, param: str, value, *, axes: int = 0, example=True):
    """True or False (or, with ``axes``, a tuple of 1 to ``axes`` of them, one per grid axis)."""
    if isinstance(value, bool):
        return value
    if axes and isinstance(value, (tuple, list)) and 1 <= len(value) <= axes and all(isinstance(v, bool) for v in value):
        return tuple(value)
    per_axis = f", or a tuple of 1 to {axes} of them (one per grid axis)" if axes else ""
    fail(owner, param, value, f"True or False{per_axis}", example, ParameterTypeError)


def check_indices(owner: str, param: str, value, *, what: str = "layer indices", single: bool = False,
                  example=(0, 1)) -> tuple:
    """Integers >= 0 in a tuple, list, range or set, as a tuple. A string is refused (``'0,1'``
    is not the layers 0 and 1); a bare int is one index when ``single``, else refused."""
    if single and as_int(value) is not None:
        value = (value,)
    bad = isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)
    ints = () if bad else tuple(as_int(v) for v in value)
    if bad or None in ints:
        hint = f" ({value!r} is one int: write ({value},) for that one or range({value}) for the first {value})" \
            if as_int(value) is not None else " (a string is not a list)" if isinstance(value, str) else ""
        fail(owner, param, value, f"{what} (integers >= 0) in a tuple, list or range{hint}", example, ParameterTypeError)
    if any(v < 0 for v in ints):
        fail(owner, param, value, f"{what}, integers >= 0", example)
    return ints


def read_safetensors(path, owner: str, expected: str, how: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; errors name the path, the format and the fix."""
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise ParameterTypeError(f"{owner}: a profile is a path to a safetensors file, got {path!r}; {how}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: profile {str(path)!r} does not exist (or is not a file); expected {expected}; {how}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors' own errors ("header too small") name neither the file nor the fix
        raise ValueError(f"{owner}: profile {str(path)!r} is not a readable safetensors file ({e}); expected {expected}; "
                         f"{how}") from e

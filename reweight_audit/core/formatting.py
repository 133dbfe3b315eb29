"""Numbers as table text: percentages with intervals, fixed decimals, the cut label. Pure; NaN shows as n/a."""
from __future__ import annotations

import math
from typing import Any


def finite(x: Any) -> bool:
    """True for a number that is neither NaN nor ±inf (None and text are not numbers)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt_pct(x: Any, digits: int = 2) -> str:
    """0.0454 -> '4.54%'; NaN/None -> 'n/a'."""
    return f"{float(x) * 100:.{digits}f}%" if finite(x) else "n/a"


def fmt_interval(x: Any, lo: Any, hi: Any, digits: int = 2) -> str:
    """'4.54% (3.90–5.20)'; the interval is left out when it is undefined."""
    s = fmt_pct(x, digits)
    if finite(x) and finite(lo) and finite(hi):
        s += f" ({float(lo) * 100:.{digits}f}–{float(hi) * 100:.{digits}f})"
    return s


def fmt_num(x: Any, digits: int = 3, suffix: str = "") -> str:
    """1.23456 -> '1.235' (``digits`` decimals, then ``suffix``); NaN/None -> 'n/a'."""
    return f"{float(x):.{digits}f}{suffix}" if finite(x) else "n/a"


def k_label(k: float) -> str:
    """The cut in percent as a label: 10.0 -> '10%'."""
    return f"{float(k):g}%"

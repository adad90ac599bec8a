"""Unit constants. Decimal prefixes for bytes and bandwidth (as vendors quote them)."""

KB = 1e3
MB = 1e6
GB = 1e9
TB = 1e12
GiB = 2**30
HOUR_S = 3600.0
MONTH_S = 30 * 24 * HOUR_S

"""Benchmark library (used by `leanops bench`, `leanops demo` and bench/): device-event timing,
energy meters, measured roofline ceilings, environment capture and result rows."""

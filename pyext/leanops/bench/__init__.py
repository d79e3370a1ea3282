"""Benchmark library (used by `leanops bench`, `leanops demo` and bench/), one home per concept:

  timing     latency: device events with L2 flushed (do_bench), CUDA-graph replay for small
             launches (do_bench_cudagraph) with a recorded fallback, wall clock on a CPU
  energy     EnergyMeter: NVML energy counter, NVML power integrated over time, RAPL through
             powercap; measure_energy / measure_idle_power; null with a reason where none reads
  roofline   measured ceilings per device (copy GB/s, bf16/fp16/int8 matmul rate), cached
  runner     Case -> row: the one runner every suite feeds (ratios vs the dense baseline,
             roofline %, TFLOP/J, J/token, peak memory, skips and failures)
  matmul, attention, model    the suites: they only describe cases
  report     tables, JSON, long-format CSV;  plot: PNG (matplotlib);  progress: rich or plain
  env        where a row was measured (versions, GPU, driver)
"""

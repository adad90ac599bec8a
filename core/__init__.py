"""tierlab core: pure specs, policies, time models, workloads and the record schema.

Nothing in this package sleeps, does I/O on its own behalf (besides the workload
readers and the parquet writer, which are called explicitly), reads a clock, or
draws from a random source it did not receive.
"""

"""A simulated GPU fleet behind the same `Driver` interface as real NVML.

Used by the quickstart, demos, dashboards and tests; it is only ever used when the user asks for
it (`--simulate` or `backend: simulated`). Values move plausibly and consistently: power follows
load and is capped at the limit (the SM clock drops when it is), energy integrates power,
temperature follows power with a lag, memory used is the sum of the processes' memory.

The model advances in fixed steps of simulated time, so the state at time t depends only on the
seed and t, not on when or how often it is read: tests can pin the clock and get exact values.

Its modules are imported by name (`exporter.simulate.driver`, `.models`, ...): the catalogue in
`models` is light, and the configuration checks model names against it without loading the rest.
"""

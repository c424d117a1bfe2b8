"""The benchmark behind `kasmina-kernels bench`: every op and every available kernel backend
against two peers, the eager reference and torch.compile of the reference.

Modules: plan (what a run covers), esper (Esper's calls' inputs), workload (inputs,
implementations, timed steps), timing (medians, device events, alternation), bytemodel
(docs/semantics.md#performance-model byte counts), sweep (check-then-time per entry), step and
esper_models (the training step), report (markdown, JSON), plots (PNG), command (the CLI entry).
"""

"""The step program: what every rank of a step does, in order, derived from one assignment
and the pipeline schedule. Torch-free, so the runtime executes it, the simulator can time
it and tests can check it without a process group."""

"""Tables and plots for runs and benchmarks."""

"""Placeholder: the runtime (loaders, runners, accuracy and latency checks) comes with issue 3."""

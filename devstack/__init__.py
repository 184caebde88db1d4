"""Local development stack: `python -m devstack` (= `make run`); helpers for the e2e tests and bench."""

"""Load tests: `python -m loadtest.bench` (= `make bench`) and the no-op ext_authz server."""

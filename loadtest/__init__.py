"""Load tests: `python -m loadtest.bench` (= `make bench`), the no-op ext_authz servers (gRPC and
HTTP) and the open-loop load generator (`python -m loadtest.openloop`)."""

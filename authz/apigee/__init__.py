"""The control plane: every outbound HTTP call to Apigee (the only package that imports httpx)."""

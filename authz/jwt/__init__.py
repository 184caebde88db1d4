"""Bearer JWTs from configured issuers: strict validation (validate.py) and key sets (jwks.py)."""

"""Keep the suite off the machine's Google credentials.

Every Apigee X/hybrid Service looks for Google Application Default Credentials at start when no analytics
Secret is given. A developer's own (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC file) or a GCE/GKE
metadata server would let a test upload records to the real ``apigee.googleapis.com``. Set here, at import,
before google-auth reads ``NO_GCE_CHECK`` (a module-level constant); tests that want ADC set
``GOOGLE_APPLICATION_CREDENTIALS`` themselves with ``monkeypatch``. Subprocesses (the local stack in e2e
tests) inherit this environment.
"""

import os
import tempfile

os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
os.environ["CLOUDSDK_CONFIG"] = os.path.join(tempfile.gettempdir(), "authz-tests-no-gcloud-config")
os.environ["NO_GCE_CHECK"] = "true"

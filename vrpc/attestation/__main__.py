"""``python -m vrpc.attestation verify|inspect|policy ...`` (same as ``vrpc attest ...``)."""

from vrpc.cli_attest import main

raise SystemExit(main())

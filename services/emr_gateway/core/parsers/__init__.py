"""The gateway's parsers: HL7 v2 messages, CSV exports (named and user profiles), FHIR bulk NDJSON.

The FHIR R4 reader is shared with inference (CDS Hooks prefetch): `fibemrss/domain/normalize/fhir_r4.py`.
"""

"""The gateway's parsers, one place per format: HL7 v2 messages (`hl7v2.py`), CSV exports (named
profiles in `csv_profiles.py`, user-written ones in `csv_mapping.py`), FHIR bulk NDJSON
(`fhir_ndjson.py`) and research Consents (`fhir_consent.py`).

The FHIR R4 bundle reader is shared with inference (CDS Hooks prefetch):
`fibemrss/domain/normalize/fhir_r4.py`.
"""

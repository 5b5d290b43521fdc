"""The gateway's answer formats: HL7 v2 ACKs and FHIR OperationOutcomes / transaction responses."""

"""Source formats into the shared schema, for every service (pure): the FHIR R4 reader, UCUM units,
plausibility ranges and canonical units, and the field-naming parse errors."""

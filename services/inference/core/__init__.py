"""Inference's core: diagnosis references, the Open Inference Protocol on tensors and names, FHIR
RiskAssessments and CDS cards, the hot-reloading model cache (no gRPC, no HTTP framework, no database).
"""

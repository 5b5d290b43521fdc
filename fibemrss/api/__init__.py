"""Generated gRPC and protobuf stubs (scripts/gen_protos.sh); never edited by hand."""

"""Generated protobuf and gRPC stubs of the chronorec.v1 API."""

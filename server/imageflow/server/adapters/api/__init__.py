"""The gRPC edge: thin servicers that translate between protobuf requests and the domain."""

"""The gRPC edge: the only package that imports Envoy's protobuf types."""

"""The gRPC face of keysvc: the only package that imports grpc. It translates
messages to domain calls and domain errors to status codes, and holds no logic."""

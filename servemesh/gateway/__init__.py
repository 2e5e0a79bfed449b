"""The Open Inference Protocol (KServe v2) front door: REST and gRPC over the mesh's public client."""

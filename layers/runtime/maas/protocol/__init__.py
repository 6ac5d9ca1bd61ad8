"""Wire schemas (Open Inference Protocol v2 and the management API) shared by server and client."""

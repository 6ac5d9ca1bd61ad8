"""Use cases over the ports. Transport-free: the HTTP API, the Lambda handlers and the CLI call these."""

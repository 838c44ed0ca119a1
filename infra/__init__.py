"""Infrastructure every layer may use and that knows nothing of the gateway's domain: database
access from async code (`infra.db`) and metrics (`infra.observability`)."""

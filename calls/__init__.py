"""The application layer: one call's life, from an authenticated, validated request to its
ledger row, owned in one place (`calls.call.ApiCall`). It uses `streaming`, `billing` and the
limits; the API edge (`llmgateway.api`) uses it and maps its errors to HTTP."""

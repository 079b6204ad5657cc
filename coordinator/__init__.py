"""The gRPC edge: validation, routing, streaming, error mapping.

The only package that imports the generated gRPC stubs. Public API:
`coordinator.server.GemmaServer` with `coordinator.service_config.ServiceConfig`
(run the service), `coordinator.client.GemmaClient` (call it from Python),
and the `gemma-serve` / `gemma-client` commands. (Tenants, adapters and
fine-tune jobs arrive with the adapter issue.)
"""

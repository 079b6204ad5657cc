"""Ray actors that each own a device-mesh slice and a sharded backbone.

Not built yet: the serving-path issue adds the actor, batching and adapter
slots here. Imports gemma_core and Ray, never the generated gRPC stubs.
"""

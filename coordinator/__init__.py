"""The gRPC edge: auth, validation, routing, adapter registry, fine-tune jobs.

Not built yet: the serving-path issue adds the server here. The only
package that imports the generated gRPC stubs.
"""

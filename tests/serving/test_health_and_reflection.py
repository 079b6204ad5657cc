"""Standard gRPC health checking and server reflection."""

from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gemma.v1.GemmaService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert "gemma.v1.GemmaService" in services
    assert "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("gemma.v1.GemmaService")
    assert {m.name for m in service.methods} == {"Forward", "GetModelInfo", "Tokenize", "Score"}
    for name, methods in (("AdapterService", {"UploadAdapter", "LoadAdapter", "UnloadAdapter",
                                              "ListAdapters", "DeleteAdapter", "ExportAdapter",
                                              "RegisterAdapter"}),
                          ("FineTuneService", {"UploadDataset", "ListDatasets", "DeleteDataset",
                                               "StartFineTune", "WatchFineTune",
                                               "CancelFineTune", "ListFineTunes"})):
        assert f"gemma.v1.{name}" in services
        assert {m.name for m in pool.FindServiceByName(f"gemma.v1.{name}").methods} == methods
    assert pool.FindMessageTypeByName("gemma.v1.TensorChunk").fields_by_name["data"]


def test_model_info(client):
    info = client.model_info()
    assert info["preset"] == "default" and info["random_weights"] is True
    assert len(info["workers"]) == 2
    for worker in info["workers"]:
        assert worker["mesh_shape"] == [1, 2] and len(worker["devices"]) == 2
    assert info["limits"]["max_sequence_length"] == 1024
    assert int(info["parameter_count"]) == 723072

"""The gRPC floor: what a Forward call costs with nothing behind it."""

import asyncio
import threading

import grpc

from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc


class FloorServer(pb_grpc.GemmaServiceServicer):
    """A bare `grpc.aio` server on its own event-loop thread whose Forward
    waits `delay_s` and then answers as the service does for one mean-pooled
    sequence: a header and one chunk of `hidden_dim` float32 zeros. No
    validation, no worker, no interceptor. Driven by the same clients at
    about the service's rate (the delay is the service's latency; its own
    overhead comes on top), the CPU it and its clients spend per call is the
    least any Python gRPC service answering in this shape pays."""

    def __init__(self, hidden_dim: int, layer: int):
        self.delay_s = 0.0
        header = pb.ForwardHeader(request_id="0" * 16, model="floor", layers=[layer],
                                  pooling=pb.POOLING_MEAN, dtype=pb.DTYPE_FLOAT32,
                                  hidden_dim=hidden_dim, total_bytes=4 * hidden_dim,
                                  worker_id="floor")
        header.sequences.add(shape=[hidden_dim])
        self._answer = (pb.ForwardResponse(header=header), pb.ForwardResponse(
            chunk=pb.TensorChunk(sequence_index=0, layer=layer, shape=[hidden_dim],
                                 dtype=pb.DTYPE_FLOAT32, data=bytes(4 * hidden_dim))))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="grpc-floor-loop")
        self._thread.start()
        self._server = None
        self.address = self._call(self._start())

    async def Forward(self, request, context):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for response in self._answer:
            yield response

    async def _start(self) -> str:
        self._server = grpc.aio.server()
        pb_grpc.add_GemmaServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    def stop(self) -> None:
        self._call(self._server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

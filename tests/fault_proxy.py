"""A gRPC proxy in front of a real worker that can fail chosen calls, as a broken sidecar or network would.

Every call of the pdmesh contract is forwarded byte for byte to the worker; `fail(method, code)` makes the
proxy answer that method (e.g. "Generate", "Prefill") with an error instead, so the worker keeps answering its
load polls while failing requests: the gray failure a circuit breaker is for. Runs on its own event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator

import grpc
from pdmesh.v1 import worker_pb2 as pb


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        # method name -> calls forwarded or failed
        self.calls: collections.Counter[str] = collections.Counter()
        self.faults: dict[str, grpc.StatusCode] = {}
        self.delays: dict[str, float] = {}  # method name -> seconds held before forwarding
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def fail(self, method: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        self.faults[method] = code

    def delay(self, method: str, seconds: float) -> None:
        self.delays[method] = seconds

    def heal(self) -> None:
        self.faults.clear()
        self.delays.clear()

    def start(self) -> str:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _serve(self) -> int:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        handlers = {}
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if method.server_streaming:
                    handlers[path] = grpc.unary_stream_rpc_method_handler(self._streaming(path, method.name))
                else:
                    handlers[path] = grpc.unary_unary_rpc_method_handler(self._unary(path, method.name))
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_ByPath(handlers)])
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def _unary(self, path: str, name: str):  # type: ignore[no-untyped-def]
        forward = self._channel.unary_unary(path)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls[name] += 1
            if name in self.faults:
                await context.abort(self.faults[name], f"injected fault on {name}")
            await asyncio.sleep(self.delays.get(name, 0.0))
            try:
                return await forward(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return handle

    def _streaming(self, path: str, name: str):  # type: ignore[no-untyped-def]
        forward = self._channel.unary_stream(path)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            self.calls[name] += 1
            if name in self.faults:
                await context.abort(self.faults[name], f"injected fault on {name}")
            await asyncio.sleep(self.delays.get(name, 0.0))
            call = forward(request)
            try:
                async for reply in call:
                    yield reply
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
            finally:
                call.cancel()  # the client left: so does the worker's stream

        return handle


class _ByPath(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)
